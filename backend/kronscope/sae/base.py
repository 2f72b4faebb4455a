"""The small interface every SAE implements, and what the architectures share.

Conventions (SAELens v6, row vectors): ``pre = (x - b_dec*[apply_b_dec_to_input]) @ W_enc
+ b_enc``; ``x_hat = f @ W_dec + b_dec``. With ``expected_average_only_in`` the input is
multiplied by ``norm_scaling_factor`` before encoding and the reconstruction divided by
it after decoding, so callers always pass and receive activations at the model's scale.

Every encode runs in chunks of ``chunk_size`` rows, so memory stays bounded however many
tokens are passed at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from .config import SAEConfig
from .errors import CheckpointError

DEFAULT_CHUNK = 4096


class EncodeOutput(NamedTuple):
    """Sparse latents of TopK-style SAEs."""

    values: Tensor
    """[..., k] activation values, largest first (zero where fewer than k are active)."""
    indices: Tensor
    """[..., k] flat latent indices (int64)."""


class ForwardOutput(NamedTuple):
    """Result of ``sae(x)``."""

    x_hat: Tensor
    """[..., d_in] reconstruction at the model's scale."""
    values: Tensor
    """[..., k] sparse values, or [..., d_sae] dense latents when ``indices`` is None."""
    indices: Tensor | None
    """[..., k] latent indices, or None for dense-latent architectures."""


class SAE(nn.Module):
    """Base class: parameters, scaling, decoding and chunking shared by all architectures."""

    architecture: ClassVar[str]
    sparse: ClassVar[bool] = False
    """True for TopK-style SAEs, whose ``encode`` returns ``(values, indices)``."""

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__()
        if cfg.architecture != self.architecture:
            raise ValueError(f"config is for {cfg.architecture!r}, not {self.architecture!r}")
        self.cfg = cfg
        self.chunk_size = DEFAULT_CHUNK
        kw = {"dtype": cfg.torch_dtype, "device": device}
        width = cfg.encoder_width
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, width, **kw))  # type: ignore[arg-type]
        self.b_enc = nn.Parameter(torch.zeros(width, **kw))  # type: ignore[arg-type]
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in, **kw))  # type: ignore[arg-type]
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))  # type: ignore[arg-type]

    # -- sizes --------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    # -- tensors ------------------------------------------------------------------------
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Names and shapes of the tensors a checkpoint of this SAE holds."""
        return {name: tuple(p.shape) for name, p in self.named_parameters()}

    def load_tensors(self, tensors: dict[str, Tensor], file: str | None = None) -> None:
        """Copy tensors in after checking names, shapes and finiteness."""
        expected = self.tensor_shapes()
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise CheckpointError(
                f"tensor missing (expected {', '.join(sorted(expected))})",
                file=file,
                field=missing[0],
            )
        with torch.no_grad():
            for name, shape in expected.items():
                t = tensors[name]
                if tuple(t.shape) != shape:
                    raise CheckpointError(
                        f"has shape {list(t.shape)}, expected {list(shape)} for this configuration",
                        file=file,
                        field=name,
                    )
                if not t.is_floating_point():
                    raise CheckpointError(
                        f"has dtype {t.dtype}, expected a floating-point tensor",
                        file=file,
                        field=name,
                    )
                if not torch.isfinite(t).all():
                    raise CheckpointError("contains NaN or infinite values", file=file, field=name)
                getattr(self, name).copy_(t.to(self.dtype))

    def state_tensors(self) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in self.named_parameters()}

    # -- scaling ------------------------------------------------------------------------
    def _scale_in(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        factor = self.cfg.norm_scaling_factor
        if self.cfg.normalize_activations == "expected_average_only_in" and factor is not None:
            x = x * factor
        return x

    def _scale_out(self, x_hat: Tensor) -> Tensor:
        factor = self.cfg.norm_scaling_factor
        if self.cfg.normalize_activations == "expected_average_only_in" and factor is not None:
            x_hat = x_hat / factor
        return x_hat

    def pre_acts(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., encoder_width]: the affine encoder, before any activation."""
        s = self._scale_in(x)
        if self.cfg.apply_b_dec_to_input:
            s = s - self.b_dec
        if s.dim() == 2:  # the chunked paths: one fused GEMM, no second pass for the bias
            return torch.addmm(self.b_enc, s, self.W_enc)
        return s @ self.W_enc + self.b_enc

    # -- chunking -----------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.d_in:
            raise ValueError(
                f"expected activations of width d_in = {self.d_in}, got shape {list(x.shape)}"
            )

    def _chunked(self, fn: Callable[[Tensor], tuple[Tensor, ...]], x: Tensor) -> tuple[Tensor, ...]:
        """Apply ``fn`` to [rows, d_in] chunks of ``x`` and restore the leading dimensions."""
        self._check_input(x)
        lead = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] <= self.chunk_size:
            outs = fn(flat)
        else:
            parts = [fn(c) for c in flat.split(self.chunk_size)]
            outs = tuple(torch.cat(ts) for ts in zip(*parts, strict=True))
        return tuple(o.reshape(*lead, *o.shape[1:]) for o in outs)

    # -- the interface ------------------------------------------------------------------
    def encode_dense(self, x: Tensor) -> Tensor:
        """[..., d_in] -> [..., d_sae]: the latent activations, zeros included."""
        return self._chunked(lambda c: (self._encode_dense(c),), x)[0]

    def _encode_dense(self, x: Tensor) -> Tensor:  # [rows, d_in] -> [rows, d_sae]
        raise NotImplementedError

    def top_latents(self, x: Tensor, k: int) -> EncodeOutput:
        """The ``k`` largest latents per row, for every architecture (display, harvest)."""
        k = min(k, self.d_sae)

        def one(c: Tensor) -> tuple[Tensor, Tensor]:
            top = self._encode_dense(c).topk(k, dim=-1)
            return top.values, top.indices

        values, indices = self._chunked(one, x)
        return EncodeOutput(values, indices)

    def decode_dense(self, f: Tensor) -> Tensor:
        """[..., d_sae] -> [..., d_in]."""
        return self._scale_out(f.to(self.dtype) @ self.W_dec + self.b_dec)

    def decode(self, values: Tensor, indices: Tensor) -> Tensor:
        """Sparse decode: [..., k] values and indices -> [..., d_in], without a dense [.., F]."""
        lead = values.shape[:-1]
        v = values.reshape(-1, values.shape[-1]).to(self.dtype)
        i = indices.reshape(-1, indices.shape[-1])
        out = nn.functional.embedding_bag(i, self.W_dec, per_sample_weights=v, mode="sum")
        return self._scale_out(out + self.b_dec).reshape(*lead, self.d_in)

    def forward(self, x: Tensor) -> ForwardOutput:
        f = self.encode_dense(x)
        return ForwardOutput(self.decode_dense(f), f, None)

    # -- construction -------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """A reasonable random initialisation (architectures refine it)."""
        w = torch.randn(self.W_enc.shape, generator=generator, dtype=torch.float32)
        self.W_enc.copy_(w / (2 * self.d_sae) ** 0.5)
        self.b_enc.zero_()
        dec = torch.randn(self.W_dec.shape, generator=generator, dtype=torch.float32)
        self.W_dec.copy_(dec / dec.norm(dim=-1, keepdim=True))
        self.b_dec.zero_()

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_sae={self.d_sae}, dtype={self.cfg.dtype}"


class TopKStyleSAE(SAE):
    """SAEs that keep exactly k latents per token: ``encode`` returns ``(values, indices)``."""

    sparse = True

    @property
    def k(self) -> int:
        assert self.cfg.k is not None
        return self.cfg.k

    def encode(self, x: Tensor) -> EncodeOutput:
        """[..., d_in] -> ``(values, indices)``, each [..., k], values largest first."""
        values, indices = self._chunked(self._encode_sparse, x)
        return EncodeOutput(values, indices)

    def _encode_sparse(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _encode_dense(self, x: Tensor) -> Tensor:
        values, indices = self._encode_sparse(x)
        return torch.zeros(
            x.shape[0], self.d_sae, dtype=values.dtype, device=values.device
        ).scatter(-1, indices, values)

    def top_latents(self, x: Tensor, k: int) -> EncodeOutput:
        if k >= self.k:
            return self.encode(x)
        values, indices = self.encode(x)
        return EncodeOutput(values[..., :k], indices[..., :k])

    def forward(self, x: Tensor) -> ForwardOutput:
        values, indices = self.encode(x)
        return ForwardOutput(self.decode(values, indices), values, indices)
