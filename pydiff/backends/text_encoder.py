"""The frozen text encoder at run time: a `tokenizers` tokenizer plus an ONNX encoder (no torch).

Prompts are checked before they reach the tokenizer (`check_prompt`: a string of at most
`MAX_PROMPT_CHARS` characters that is valid Unicode); a tokenizer file is at most
`MAX_TOKENIZER_BYTES` and must encode characters outside its vocabulary (an unknown token such as
BERT's [UNK], or byte-level pieces), never drop them.
"""

from __future__ import annotations

import collections
import os
import threading

import numpy as np
from tokenizers import Tokenizer

from pydiff.backends.ort import create_session
from pydiff.errors import PackageError
from pydiff.package import Package, check_text_encoder_io

MAX_PROMPT_CHARS = 16384  # 4 characters a token at the longest text_encoder.max_length (4096)
MAX_TOKENIZER_BYTES = 64 << 20  # the largest common tokenizer.json files are about 20 MB
# characters no vocabulary of the bundled kind holds: what an unknown token must stand for
_UNKNOWN_PROBE = "\u2603\U0001d518"


def check_prompt(prompt, what: str = "prompt") -> str:
    """`prompt` if it is a string of at most MAX_PROMPT_CHARS characters, valid Unicode (no lone
    surrogates); else a TypeError / ValueError naming `what`."""
    if not isinstance(prompt, str):
        raise TypeError(f"{what}: expected a string, got {type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"{what}: {len(prompt)} characters, over the limit of {MAX_PROMPT_CHARS}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what}: not valid Unicode text ({e.reason} at character {e.start}: {prompt[e.start]!r})"
        ) from None
    return prompt


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_tokenizer(path) -> Tokenizer:
    """A `tokenizers` JSON file, size-capped before it is read; it must encode unknown characters."""
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise PackageError(f"{path}: cannot read the tokenizer ({e.strerror or e})") from None
    if size > MAX_TOKENIZER_BYTES:
        raise PackageError(
            f"{path}: the tokenizer is {size} bytes, over the {MAX_TOKENIZER_BYTES}-byte limit"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for a file it cannot parse
        raise PackageError(f"{path}: not a tokenizers JSON file ({_first_line(e)})") from None
    tokenizer.no_truncation()  # the file's own limit could cut the probe to special tokens alone
    # (the TextEncoder sets its max_length afterwards)
    try:
        enc = tokenizer.encode(_UNKNOWN_PROBE)
    except Exception as e:  # e.g. WordLevel without an unknown token
        raise PackageError(
            f"{path}: the tokenizer cannot encode characters outside its vocabulary "
            f"({_first_line(e)}); it needs an unknown token such as [UNK]"
        ) from None
    if not any(m and not sp for m, sp in zip(enc.attention_mask, enc.special_tokens_mask)):
        raise PackageError(
            f"{path}: the tokenizer drops characters outside its vocabulary (a prompt of them "
            f"would encode as no text); it needs an unknown token such as [UNK]"
        )
    return tokenizer


class TextEncoder:
    """Token embeddings of prompts from an exported encoder (e.g. all-MiniLM-L6-v2, int8).

    ONNX inputs `input_ids` and, where the network takes one, `attention_mask` (int64 [B, L]);
    output `last_hidden_state` [B, L, D]. Padding and truncation are the tokenizer file's own
    where it sets them (the diffusers importer writes CLIP's: `<|endoftext|>` or the tokenizer's
    pad token, to `max_length`), else BERT's [PAD] (id 0 where the vocabulary has none).
    """

    CACHE_SIZE = 256  # prompts whose states are kept (per-prompt encoders; about 24 KB each here)

    def __init__(
        self,
        onnx_path: str,
        tokenizer_path: str,
        max_length: int = 16,
        providers: list[str] | None = None,
        session_options=None,
        session=None,
        per_prompt: bool = True,
    ):
        """`session`: an InferenceSession of `onnx_path` already made (then `providers` and
        `session_options` are unused). `per_prompt`: encode each prompt alone (see encode); False
        runs a call's prompts as one batch (the package format's text_encoder.encode "batched")."""

        self.max_length = int(max_length)
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.tokenizer.enable_truncation(self.max_length)
        # the tokenizer's own pad token where tokenizer.json sets one (CLIP pads with <|endoftext|>,
        # which a network fed no attention mask has seen in training), else BERT's [PAD]
        pad = self.tokenizer.padding
        if pad:
            pad_id, pad_token = pad["pad_id"], pad["pad_token"]
        else:
            pad_id, pad_token = self.tokenizer.token_to_id("[PAD]"), "[PAD]"
        self.tokenizer.enable_padding(
            length=self.max_length, pad_id=0 if pad_id is None else pad_id, pad_token=pad_token
        )
        if session is None:
            session = create_session(
                onnx_path, providers or ["CPUExecutionProvider"], session_options, required=()
            )
        self.session = session
        self.per_prompt = bool(per_prompt)
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._input_names = {i.name for i in self.session.get_inputs()}

    def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Return (input_ids, attention_mask), both int64 [B, max_length]; each prompt is checked
        (`check_prompt`) first."""
        if isinstance(prompts, str):
            raise TypeError("prompts: expected a list of strings, got one string")
        prompts = [check_prompt(p, f"prompt[{i}]") for i, p in enumerate(prompts)]
        try:
            enc = self.tokenizer.encode_batch(prompts)
        except Exception as e:  # tokenizers raises plain Exception; name the prompt it refused
            for i, p in enumerate(prompts):
                try:
                    self.tokenizer.encode(p)
                except Exception:
                    raise ValueError(
                        f"prompt[{i}] {p[:60]!r}: the tokenizer refuses it ({_first_line(e)})"
                    ) from None
            raise ValueError(f"the tokenizer refuses the prompts ({_first_line(e)})") from None
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        return ids, mask

    def encode(self, prompts: list[str] | str) -> tuple[np.ndarray, np.ndarray]:
        """Return (states float32 [B, L, D], mask float32 [B, L]) for a list of prompts.

        Each distinct prompt is encoded on its own: an int8 encoder with dynamic quantisation
        (DynamicQuantizeLinear) takes one scale over the whole batch, so a prompt encoded with others
        would change with them (by 15-35% here), and a seed would not give one prompt's image
        whatever else is in the call. Alone, a prompt's states depend on the prompt only."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts: expected a string or a list of strings, got {type(prompts).__name__}")
        prompts = list(prompts)
        ids, mask = self.tokenize(prompts)
        if not self.per_prompt:
            return self._run(ids, mask), mask.astype(np.float32)
        rows: dict[str, np.ndarray] = {}
        for i, p in enumerate(prompts):
            if p not in rows:
                rows[p] = self._encoded(p, ids[i : i + 1], mask[i : i + 1])
        states = np.concatenate([rows[p] for p in prompts]) if prompts else np.zeros((0, self.max_length, 0))
        return states.astype(np.float32), mask.astype(np.float32)

    def _encoded(self, prompt: str, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """One prompt's states, from the cache of the CACHE_SIZE last prompts when there: encoded
        alone, a prompt's states depend on it only, so a cached copy is the same bits (a server
        encodes the empty negative prompt, and popular prompts, once)."""
        with self._cache_lock:
            hit = self._cache.get(prompt)
            if hit is not None:
                self._cache.move_to_end(prompt)
                return hit
        states = self._run(ids, mask)
        states.setflags(write=False)
        with self._cache_lock:
            self._cache[prompt] = states
            while len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
        return states

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """last_hidden_state float32 [B, L, D] of one encoder run."""
        feeds = {"input_ids": ids}
        if "attention_mask" in self._input_names:  # CLIP as Stable Diffusion runs it takes no mask
            feeds["attention_mask"] = mask
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (states,) = self.session.run(["last_hidden_state"], feeds)
        return states.astype(np.float32)

    def __call__(self, prompts):
        return self.encode(prompts)


def load_text_encoder(package: Package, providers, session_options=None, *, required=()):
    """The package's TextEncoder (ORT session checked against the format), or None.
    `required`: as create_session's (default: whatever providers ONNX Runtime could start)."""
    te = package.text_encoder
    if te is None:
        return None
    session = create_session(te.onnx, providers, session_options, required=required)
    try:
        enc = TextEncoder(
            str(te.onnx),
            str(te.tokenizer),
            te.max_length,
            session=session,
            per_prompt=te.encode == "per_prompt",
        )
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PackageError(f"{te.onnx} / {te.tokenizer}: cannot load the text encoder ({msg})") from None
    check_text_encoder_io(package, enc.session)
    return enc
