"""An lmms-eval model that scores a `mambamia export` on video tasks.

    pip install 'mambamia[lmms]'
    python -m lmms_eval --model mambamia --model_args pretrained=EXPORT_DIR,encoder=VISION \\
        --tasks videomme --batch_size 1 --output_path eval/

lmms-eval finds the model through the `lmms_eval.models` entry point that mambamia's package
metadata declares (pyproject.toml), so any lmms-eval task runs on an export without copying code
into lmms-eval. `--model_args` (comma-separated key=value):
  pretrained      the export folder (or a hub id of one); required
  encoder         the vision tower, a folder or hub id (default: EXPORT_DIR/vision)
  frames, fps     frames sampled at most per video and the sampling rate (default: what training
                  used, from the export's training.json; else 32 frames at 1 fps)
  pool, layer     patch-grid pooling and hidden layer of the tower, as `mambamia convert` made the
                  training features (default: 1, and training's layer, else -2)
  max_new_tokens  the generation budget when a task sets none (default 16)
  device          'cuda', 'cpu', ... (default: CUDA when present)

Videos are prepared exactly as `mambamia ask` prepares them (same decoder, sampling, tower and
prompt template), so a task scored here and the same items converted to shards and scored with
`mambamia eval` pick the same options.

What lmms-eval calls:
- `loglikelihood`: for each (context, continuation) on a document's video, the continuation's mean
  negative log-likelihood after the chat-templated context and whether greedy decoding would
  produce it. The negative value is lmms-eval's convention for its own models: its
  multiple-choice scoring picks the option with the lowest value (`np.argmin`). With one-token
  answers (option letters) this is `mambamia eval --method loglik --target letter`. (lmms-eval
  0.7.3 turns loglikelihood results into strings before its multiple_choice scoring reads them,
  which fails for every model; its generated-answer tasks run.)
- `generate_until`: greedy decoding after the chat-templated context, cut at the first `until`
  string; sampling settings in a task's generation_kwargs are ignored (answers are reproducible).
A context without `<video>` gets the video in front of it (`<video>\\n` + context), as training's
conversations put it. One process; the videos of a run are decoded one at a time.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "mambamia"


def manifest() -> ModelManifest:
    """The `lmms_eval.models` entry point: `--model mambamia` is this module's `MambaMia`."""
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.MambaMia")


class MambaMia(lmms):
    """A `mambamia export` with its vision tower, answering lmms-eval's requests on videos."""

    def __init__(self, pretrained: str, encoder: str | None = None, frames: int | None = None,
                 fps: float | None = None, pool: int = 1, layer: int | None = None,
                 max_new_tokens: int = 16, device: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, **unknown) -> None:
        # batch_size and max_batch_size come from lmms-eval's own flags; requests run one at a time
        super().__init__()
        if unknown:
            raise ValueError(f"mambamia: unknown --model_args {sorted(unknown)}; expected pretrained, encoder, "
                             "frames, fps, pool, layer, max_new_tokens, device")
        import torch

        from model.video_llm import VideoLLM
        from trainer.ask import check_export, encoder_folder, export_folder, load_encoder
        from trainer.evaluate import ModelQA

        export = export_folder(str(pretrained))
        record = check_export(export)
        features = dict(record.get("features") or {})
        if layer is not None:
            features["layer"] = int(layer)
        self.frames = int(frames or record.get("max_frames") or 32)
        self.fps = float(fps or features.get("fps") or 1.0)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder = load_encoder(encoder_folder(SimpleNamespace(encoder=encoder), export, features),
                                    features, int(pool))
        model = VideoLLM.from_pretrained(export).to(self.device)
        if self.encoder.dim != model.config.compressor.input_dim:
            raise ValueError(f"mambamia: encoder {self.encoder.config.path} gives {self.encoder.dim}-wide "
                             f"features; the export's compressor reads {model.config.compressor.input_dim}")
        self.tokenizer = model.tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.qa = ModelQA(model, model.tokenizer, max_frames=None, max_new_tokens=self.max_new_tokens)
        self._video: tuple[str, np.ndarray] | None = None  # the last video's features

    # ------------------------------------------------------------------------------ inputs
    def _features(self, request) -> np.ndarray:
        """Features of the one video the request's document shows (cached: options repeat it)."""
        from trainer.ask import decode

        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = visuals if isinstance(visuals, (list, tuple)) else [visuals]
        if len(visuals) != 1 or not isinstance(visuals[0], str):
            raise ValueError(f"mambamia: task {task}, doc {doc_id}: expected one video file path from "
                             f"doc_to_visual, got {[type(v).__name__ for v in visuals]}")
        if self._video is None or self._video[0] != visuals[0]:
            decoded = decode(Path(visuals[0]), self.fps, self.frames)
            self._video = (visuals[0], self.encoder(decoded.frames))
        return self._video[1]

    @staticmethod
    def _turn(context: str) -> str:
        """The user turn: the context, with the video in front unless it places `<video>` itself."""
        from data.text import VIDEO_TOKEN

        return context if VIDEO_TOKEN in context else f"{VIDEO_TOKEN}\n{context}"

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _forward(self, ids: list[int], features: np.ndarray):
        import torch

        feats = torch.from_numpy(features.astype(np.float32)).to(self.device, self.qa.dtype).unsqueeze(0)
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        with torch.no_grad():
            return self.qa.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), features=feats,
                                 frame_mask=torch.ones(1, feats.shape[1], dtype=torch.bool,
                                                       device=self.device)).logits[0]

    # ------------------------------------------------------------------------------ requests
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(mean negative log-likelihood of the continuation, whether it is the greedy one)."""
        import torch

        out = []
        for request in requests:
            context, target, _, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else str(target(self.task_dict[task][split][doc_id]))
            prompt_text = self.qa.prompt_text(self._turn(context))
            prompt, full = self._ids(prompt_text), self._ids(prompt_text + continuation)
            # BPE may merge across the boundary; then the continuation is tokenized on its own
            # (mambamia eval's rule, so both score the same tokens)
            cont = full[len(prompt):] if full[:len(prompt)] == prompt else self._ids(continuation)
            if not cont:
                out.append((0.0, True))
                continue
            logits = self._forward(prompt + cont, self._features(request))
            logp = torch.log_softmax(logits[-len(cont) - 1:-1].float(), dim=-1)
            wanted = torch.tensor(cont, device=logp.device)
            token_lp = logp.gather(-1, wanted.unsqueeze(-1)).squeeze(-1).double()
            out.append((float(-token_lp.mean()), bool((logp.argmax(-1) == wanted).all())))
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for request in requests:
            context, gen_kwargs, *_ = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            self.qa.max_new_tokens = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            text = self.qa.generate(self._turn(context), self._features(request))
            for stop in until:
                text = text.split(stop)[0] if stop else text
            out.append(text)
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mambamia: multi-round generation is not supported; use single-turn tasks")
