"""GPT-style language modelling (Radford et al. 2018/2019): the task around `polyformer.models.gpt.GPT` (a causal
decoder-only backbone, token embedding tied with the output head), with next-token cross-entropy, sampling with the
KV cache, and the tokenizer its checkpoints carry.

The network is held as `self.model`; its first weights may come from GPT-2 (`init_from="hf:gpt2"` or a local
`save_pretrained` folder, `polyformer.weights.gpt2`) or a polyformer `.ckpt`.
Metrics: loss (nats per token), perplexity = exp(loss), and bits per byte = total nats / (ln 2 * UTF-8 bytes of the
targets), which does not depend on the tokenizer, so runs with different tokenizers compare.
Legend: B batch, T positions, V vocabulary, Vp vocabulary padded to a multiple of 64.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from polyformer.backbone import Cache, TransformerConfig
from polyformer.data.info import DataInfo
from polyformer.data.tokenizers import Tokenizer, decode_rows
from polyformer.decoding import Decoder, check_sampling, sample
from polyformer.models.gpt import GPT, GPTConfig, check_decoder_only
from polyformer.tasks.base import OptimizerConfig, TaskModule
from polyformer.tasks.media import Media, MediaRequest, Table

# GPT-2's layout (pre-LN, learned positions, final norm) at a small size; presets set the size.
GPT_BACKBONE = TransformerConfig(width=256, depth=4, heads=4, position="learned", max_len=256, causal=True)


@dataclass
class SamplingConfig:
    """Samples printed at the end of fit (and the defaults of `generate_text`)."""

    prompts: list[str] = field(default_factory=list)  # empty: print no samples
    max_new_tokens: int = 100
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = 50
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:  # at configuration time, not after training when the samples are drawn
        check_sampling(self.max_new_tokens, self.temperature, self.top_k, self.top_p, prefix="model.samples.")


def check_same_tokenizer(checkpoint: Tokenizer, data: Tokenizer) -> None:
    """ValueError unless both tokenizers turn text into the same ids. Equal vocab_size is not enough: another BPE
    of the same size gives every id another meaning, and the model would train or score on scrambled tokens."""
    ours, theirs = json.loads(checkpoint.to_json()), json.loads(data.to_json())
    if ours == theirs:
        return
    fix = (
        "use the data settings the checkpoint was trained with (the same data.tokenizer, bpe_vocab_size and "
        "corpus), or set data.tokenizer to a tokenizer.json holding the checkpoint's tokenizer"
    )
    if checkpoint.vocab_size != data.vocab_size:
        raise ValueError(
            f"the checkpoint's tokenizer has vocab_size {checkpoint.vocab_size}, the data module's "
            f"{data.vocab_size}; {fix}"
        )
    a, b = checkpoint.inner, data.inner
    differ = next((i for i in range(checkpoint.vocab_size) if a.id_to_token(i) != b.id_to_token(i)), None)
    if differ is not None:
        what = f"token id {differ} is {a.id_to_token(differ)!r} in the checkpoint but {b.id_to_token(differ)!r} in"
    else:  # same vocabulary, other merges / normalizer / pre-tokenizer: the same text still gets other ids
        parts = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        what = f"the vocabularies match but the tokenizer settings ({', '.join(parts)}) differ from"
    raise ValueError(
        f"the checkpoint's tokenizer and the data module's have the same vocab_size ({data.vocab_size}) but are "
        f"different tokenizers: {what} the data module; {fix}"
    )


class TokenLoss(Metric):
    """Sums of target nats, tokens and bytes across batches and ranks (exact: float64 / int64 sums)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nats", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("bytes", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nats: Tensor, tokens: int | Tensor, num_bytes: Tensor) -> None:
        # Out of place: states created under inference_mode (a validate() call) cannot be updated in place later.
        self.nats = self.nats + nats.double()
        self.tokens = self.tokens + tokens
        self.bytes = self.bytes + num_bytes.long()

    def compute(self) -> dict[str, Tensor]:
        loss = self.nats / self.tokens
        return {"loss": loss, "ppl": loss.exp(), "bpb": self.nats / (math.log(2) * self.bytes.clamp(min=1))}


class LanguageModel(TaskModule):
    architecture_hparams = ("backbone", "vocab_size", "tie_embeddings", "logit_softcap")
    size_arguments = ("vocab_size",)

    def __init__(
        self,
        backbone: TransformerConfig = GPT_BACKBONE,
        vocab_size: int | None = None,  # linked from the data module's tokenizer
        tie_embeddings: bool = True,  # output head shares the token embedding matrix
        logit_softcap: float | None = None,  # logits = c tanh(logits / c) (Gemma 2); None = uncapped (GPT-2)
        init_from: str | None = None,  # "hf:gpt2", "hf:gpt2-medium", "hf:<save_pretrained folder>" or a .ckpt
        samples: SamplingConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(optimizer, compile, activation_checkpointing, init_from)
        # GPTConfig checks this too; here a wrong preset fails at once, before the data module prepares its data.
        check_decoder_only(backbone)
        self.save_hyperparameters()
        self.backbone_cfg, self.vocab_size, self.tie_embeddings = backbone, vocab_size, tie_embeddings
        self.logit_softcap = logit_softcap
        self.samples = samples or SamplingConfig()
        self.tokenizer: Tokenizer | None = None  # from the data module, or from the checkpoint
        # Bytes each token stands for, (Vp,) int64, for bits per byte; zeros while no tokenizer is known (bare
        # weights). Not persistent: it follows from the tokenizer, which checkpoints carry as JSON.
        self.register_buffer("token_bytes", None, persistent=False)
        self.val_metric = TokenLoss()
        self.build()

    # ---- building ---------------------------------------------------------------------------------------------
    def build_model(self) -> GPT:
        assert self.vocab_size is not None
        model = GPT(GPTConfig(self.backbone_cfg, self.vocab_size, self.tie_embeddings, self.logit_softcap))
        self.token_bytes = self._token_bytes(model.cfg.padded_vocab_size)
        return model

    def connect_data(self, info: DataInfo) -> None:
        self.link("vocab_size", info.vocab_size)
        if info.tokenizer is not None:
            if self.tokenizer is not None:  # from a checkpoint (load_task): its token ids must mean the same
                check_same_tokenizer(self.tokenizer, info.tokenizer)
            self._set_tokenizer(info.tokenizer)
        cfg = self.backbone_cfg
        if info.block_size is not None and cfg.position == "learned" and info.block_size > cfg.max_len:
            raise ValueError(
                f"data.block_size ({info.block_size}) exceeds model.backbone.max_len ({cfg.max_len}), the "
                "learned position table; raise max_len or lower block_size"
            )

    def _set_tokenizer(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        if self.model is not None:  # built before the tokenizer was known (sizes given): bytes per token now
            self.token_bytes = self._token_bytes(self.model.cfg.padded_vocab_size).to(self.device)

    def _token_bytes(self, rows: int) -> Tensor:
        table = torch.zeros(rows, dtype=torch.long)
        if self.tokenizer is not None:
            table[: self.tokenizer.vocab_size] = torch.tensor(self.tokenizer.token_bytes())
        return table

    # ---- model ------------------------------------------------------------------------------------------------
    def forward(
        self,
        tokens: Tensor,
        padding_mask: Tensor | None = None,
        positions: Tensor | None = None,
        cache: Cache | None = None,
    ) -> Tensor:  # (B, T) -> (B, T, V)
        return self.model(tokens, padding_mask, positions, cache)

    def token_losses(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token nats (B, T) and target bytes (B, T) of a (B, T + 1) block."""
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = self.model(inputs)
        nats = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        return nats.view_as(targets), self.token_bytes[targets]

    # ---- steps ------------------------------------------------------------------------------------------------
    def training_flops(self, batch: Tensor) -> float:
        # Blocks of T + 1 tokens: the inputs are the first T.
        return self.model.training_flops(batch.shape[0], batch.shape[1] - 1)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        nats, num_bytes = self.token_losses(batch)
        loss = nats.mean()
        bpb = nats.sum().detach() / (math.log(2) * num_bytes.sum().clamp(min=1))
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/ppl": loss.detach().exp(), "train/bpb": bpb})
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        nats, num_bytes = self.token_losses(batch)
        self.val_metric.update(nats.sum(), nats.numel(), num_bytes.sum())

    def on_validation_epoch_end(self) -> None:
        values = self.val_metric.compute()  # summed over ranks, so 1 and 2 processes give the same numbers
        self.val_metric.reset()
        self.log("val/loss", values["loss"].float(), prog_bar=True)
        self.log_dict({"val/ppl": values["ppl"].float(), "val/bpb": values["bpb"].float()})

    def on_train_end(self) -> None:  # before on_fit_end, where RunSummary prints the paths last
        if self.samples.prompts and self.trainer.is_global_zero:
            texts = self.generate_text(self.samples.prompts)
            rule = "-" * 80
            print(f"\n{rule}\nSamples (temperature {self.samples.temperature}, top_k {self.samples.top_k}):")
            for prompt, text in zip(self.samples.prompts, texts):
                print(f"{rule}\n{prompt}{text}")
            print(rule)

    # ---- generation -------------------------------------------------------------------------------------------
    def decoder(self, use_cache: bool = True) -> Decoder:
        """A `Decoder` whose logits never pick padding, the vocabulary's padded tail, or specials other than eos."""
        banned = [i for i in (self.tokenizer.special_ids if self.tokenizer else []) if i != self.tokenizer.eos_id]

        def forward(tokens: Tensor, mask: Tensor | None, positions: Tensor, cache: Cache | None) -> Tensor:
            logits = self.model(tokens, mask, positions, cache)  # (N, t, V)
            if not banned:
                return logits
            return logits.index_fill(-1, torch.tensor(banned, device=logits.device), float("-inf"))

        return Decoder(forward, self.model.new_cache, use_cache)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int = 100,
        temperature: float = 0.8,
        top_k: int | None = 50,
        top_p: float | None = None,
        eos_id: int | None = None,
        seed: int | None = 0,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """Continue token prompts (different lengths are fine); stops at eos_id. Returns the new tokens."""
        longest = max(map(len, prompts), default=0) + max_new_tokens
        cfg = self.model.cfg.backbone
        if cfg.position == "learned" and longest > cfg.max_len:
            raise ValueError(
                f"prompt + max_new_tokens = {longest} tokens exceed the model's context (backbone.max_len = "
                f"{cfg.max_len}); lower max_new_tokens or shorten the prompt"
            )
        generator = None if seed is None else torch.Generator(self.device).manual_seed(seed)
        pad = self.tokenizer.pad_id if self.tokenizer else 0
        was_training = self.training
        self.eval()
        try:
            return sample(
                self.decoder(use_cache), prompts, max_new_tokens, temperature, top_k, top_p,
                eos_id=eos_id, pad_id=pad, device=self.device, generator=generator,
            )  # fmt: skip
        finally:
            self.train(was_training)

    def generate_text(
        self,
        prompts: list[str],
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """Continue text prompts (None = the `samples` setting). Each prompt starts after an end-of-text token, like
        a new document in training."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: train it with a text data module or load a checkpoint")
        s, tok = self.samples, self.tokenizer
        ids = self.generate(
            [[tok.bos_id, *tok.encode(p)] for p in prompts],
            max_new_tokens=s.max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=s.temperature if temperature is None else temperature,
            top_k=s.top_k if top_k is None else top_k,
            top_p=s.top_p if top_p is None else top_p,
            eos_id=tok.eos_id,
            seed=s.seed if seed is None else seed,
        )
        return tok.decode_batch(ids)

    # ---- media ------------------------------------------------------------------------------------------------
    def media(self, batch: Any, request: MediaRequest) -> list[Media]:
        """A table "samples" (step, prompt, sampled continuation) for up to `request.num_samples` prompts:
        `request.prompts`, else the task's `samples.prompts`, else the starts (16 tokens) of the validation blocks
        in `batch` (B, T + 1). Sampled with the request's max_new_tokens / temperature / top_k (None = the task's)."""
        tok = self.tokenizer
        if tok is None:
            return []
        prompts = list(request.prompts) or list(self.samples.prompts)
        if not prompts and isinstance(batch, Tensor):
            prompts = decode_rows(tok, batch[:, :16])  # decoded text, re-encoded by generate_text: CPU is fine
        if not prompts:
            return []
        prompts = prompts[: request.num_samples]
        texts = self.generate_text(
            prompts, max_new_tokens=request.max_new_tokens, temperature=request.temperature, top_k=request.top_k
        )
        rows: list[list[Any]] = [[self.global_step, p, t] for p, t in zip(prompts, texts)]
        return [Table("samples", ["step", "prompt", "continuation"], rows)]

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.tokenizer is not None:  # a JSON string: `generate --ckpt` needs nothing else
            checkpoint["tokenizer"] = self.tokenizer.to_json()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "tokenizer" in checkpoint and self.tokenizer is None:
            self._set_tokenizer(Tokenizer.from_json(checkpoint["tokenizer"]))
        elif "tokenizer" in checkpoint:  # `fit/validate/test --ckpt_path`: restored after setup took the data's
            check_same_tokenizer(Tokenizer.from_json(checkpoint["tokenizer"]), self.tokenizer)
