"""The frozen text encoder at run time: a `tokenizers` tokenizer plus an ONNX encoder (no torch)."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from pydiff.backends.ort import create_session
from pydiff.errors import PackageError
from pydiff.package import Package, check_text_encoder_io


class TextEncoder:
    """Token embeddings of prompts from an exported encoder (e.g. all-MiniLM-L6-v2, int8).

    ONNX inputs `input_ids`, `attention_mask` (int64 [B, L]); output `last_hidden_state` [B, L, D].
    """

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
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
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
        self._input_names = {i.name for i in self.session.get_inputs()}

    def tokenize(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Return (input_ids, attention_mask), both int64 [B, max_length]."""
        enc = self.tokenizer.encode_batch(list(prompts))
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
        prompts = list(prompts)
        ids, mask = self.tokenize(prompts)
        if not self.per_prompt:
            return self._run(ids, mask), mask.astype(np.float32)
        rows: dict[str, np.ndarray] = {}
        for i, p in enumerate(prompts):
            if p not in rows:
                rows[p] = self._run(ids[i : i + 1], mask[i : i + 1])
        states = np.concatenate([rows[p] for p in prompts]) if prompts else np.zeros((0, self.max_length, 0))
        return states.astype(np.float32), mask.astype(np.float32)

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """last_hidden_state float32 [B, L, D] of one encoder run."""
        feeds = {"input_ids": ids, "attention_mask": mask}
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
