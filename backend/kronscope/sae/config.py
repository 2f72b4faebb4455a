"""The configuration of one SAE, in the layout of SAELens v6 ``cfg.json`` (plus ``kronsae``).

Unknown keys are kept in ``extra`` and written back unchanged: a checkpoint's configuration
is never silently trimmed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ConfigError

ARCHITECTURES = ("kronsae", "topk", "jumprelu", "standard")
COMPOSITIONS = ("mand", "relu_product", "product")
NORMALIZATIONS = ("none", "expected_average_only_in")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

# Far above any real SAE (d_in ~ 10^4, d_sae ~ 10^6); refuses absurd sizes before any
# tensor is allocated for them.
MAX_DIMENSION = 1 << 24

# Keys this dataclass owns; everything else in a cfg.json lands in `extra`.
_OWN_KEYS = (
    "architecture",
    "d_in",
    "d_sae",
    "dtype",
    "apply_b_dec_to_input",
    "normalize_activations",
    "norm_scaling_factor",
    "k",
    "h",
    "m",
    "n",
    "composition",
    "rescale_acts_by_decoder_norm",
    "metadata",
)


def _int(d: dict[str, Any], key: str, file: str | None) -> int:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"must be a whole number, got {value!r}", field=key, file=file)
    return value


def _bool(d: dict[str, Any], key: str, default: bool, file: str | None) -> bool:
    value = d.get(key, default)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if value is None:
        return default
    raise ConfigError(f"must be true or false, got {value!r}", field=key, file=file)


def normalise_dtype(value: Any, file: str | None = None) -> str:
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(
            f"unsupported dtype {value!r}; use one of {', '.join(DTYPES)}", field="dtype", file=file
        )
    return name


@dataclass
class SAEConfig:
    """Configuration of one SAE (SAELens v6 key names)."""

    architecture: str
    """``kronsae``, ``topk``, ``jumprelu`` or ``standard``."""
    d_in: int
    """Width d of the activations the SAE reads."""
    d_sae: int
    """Dictionary size F."""
    dtype: str = "float32"
    """Parameter dtype: ``float32``, ``float16`` or ``bfloat16``."""
    apply_b_dec_to_input: bool = False
    """Subtract ``b_dec`` from the input before encoding (the KronSAE paper does not)."""
    normalize_activations: str = "none"
    """``none`` or ``expected_average_only_in`` (then ``norm_scaling_factor`` is required)."""
    norm_scaling_factor: float | None = None
    """Inputs are multiplied by this before encoding; reconstructions divided by it."""
    k: int | None = None
    """Latents kept per token (``topk`` and ``kronsae``)."""
    h: int | None = None
    """KronSAE heads."""
    m: int | None = None
    """KronSAE base size per head."""
    n: int | None = None
    """KronSAE extension size per head (``m <= n``)."""
    composition: str = "mand"
    """KronSAE composition: ``mand`` (default), ``relu_product`` or ``product`` (ablations)."""
    rescale_acts_by_decoder_norm: bool = False
    """SAELens ``topk`` flag; SAELens folds the norm into the weights on save."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """``model_name``, ``hook_name``, ``context_size``, ``prepend_bos``, ``training``, ``metrics``."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Keys we do not interpret, kept as they were."""

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------
    def validate(self, file: str | None = None) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}",
                field="architecture",
                file=file,
            )
        for key in ("d_in", "d_sae"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"must be a positive whole number, got {value!r}", field=key, file=file
                )
            if value > MAX_DIMENSION:
                raise ConfigError(
                    f"{value} is larger than the largest supported size ({MAX_DIMENSION:,})",
                    field=key,
                    file=file,
                )
        self.dtype = normalise_dtype(self.dtype, file)
        if self.normalize_activations not in NORMALIZATIONS:
            raise ConfigError(
                f"must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize_activations!r}",
                field="normalize_activations",
                file=file,
            )
        if self.normalize_activations == "expected_average_only_in":
            f = self.norm_scaling_factor
            if (
                isinstance(f, bool)
                or not isinstance(f, int | float)
                or not f > 0
                or f != f
                or f == float("inf")
            ):
                raise ConfigError(
                    "a positive finite number is required when normalize_activations is "
                    f"expected_average_only_in, got {f!r}",
                    field="norm_scaling_factor",
                    file=file,
                )
        if self.architecture in ("topk", "kronsae"):
            k = self.k
            if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
                raise ConfigError(
                    f"must be a positive whole number, got {k!r}", field="k", file=file
                )
            if k > self.d_sae:
                raise ConfigError(
                    f"k = {k} is larger than the dictionary (d_sae = {self.d_sae})",
                    field="k",
                    file=file,
                )
        if self.architecture == "kronsae":
            for key in ("h", "m", "n"):
                value = getattr(self, key)
                if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                    raise ConfigError(
                        f"must be a positive whole number, got {value!r}", field=key, file=file
                    )
                if value > MAX_DIMENSION:
                    raise ConfigError(f"{value} is too large", field=key, file=file)
            assert self.h and self.m and self.n
            if self.h * self.m * self.n != self.d_sae:
                raise ConfigError(
                    f"h*m*n = {self.h}*{self.m}*{self.n} = {self.h * self.m * self.n} "
                    f"does not equal d_sae = {self.d_sae}",
                    field="d_sae",
                    file=file,
                )
            if self.m > self.n:
                raise ConfigError(
                    f"base size m = {self.m} must not exceed extension size n = {self.n}",
                    field="m",
                    file=file,
                )
            if self.composition not in COMPOSITIONS:
                raise ConfigError(
                    f"unknown composition {self.composition!r}; use one of {', '.join(COMPOSITIONS)}",
                    field="composition",
                    file=file,
                )
        if not isinstance(self.metadata, dict):
            raise ConfigError("must be an object", field="metadata", file=file)

    # -- conversion -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], file: str | None = None) -> SAEConfig:
        """Read a SAELens v6 style ``cfg.json`` dict; unknown keys go to ``extra``."""
        if not isinstance(data, dict):
            raise ConfigError("the configuration must be a JSON object", file=file)
        if "architecture" not in data:
            raise ConfigError("is missing", field="architecture", file=file)
        for key in ("d_in", "d_sae"):
            if key not in data:
                raise ConfigError("is missing", field=key, file=file)
        arch = data["architecture"]
        if not isinstance(arch, str):
            raise ConfigError(f"must be a string, got {arch!r}", field="architecture", file=file)
        kwargs: dict[str, Any] = {
            "architecture": arch,
            "d_in": _int(data, "d_in", file),
            "d_sae": _int(data, "d_sae", file),
            "dtype": data.get("dtype", "float32"),
            "apply_b_dec_to_input": _bool(data, "apply_b_dec_to_input", arch != "kronsae", file),
            "normalize_activations": data.get("normalize_activations", "none") or "none",
            "norm_scaling_factor": data.get("norm_scaling_factor"),
            "composition": data.get("composition", "mand"),
            "rescale_acts_by_decoder_norm": _bool(
                data, "rescale_acts_by_decoder_norm", False, file
            ),
            "metadata": copy.deepcopy(data.get("metadata") or {}),
        }
        for key in ("k", "h", "m", "n"):
            if data.get(key) is not None:
                kwargs[key] = _int(data, key, file)
        kwargs["extra"] = {k: copy.deepcopy(v) for k, v in data.items() if k not in _OWN_KEYS}
        cfg = cls.__new__(cls)
        for name, value in kwargs.items():
            setattr(cfg, name, value)
        for name in ("k", "h", "m", "n"):
            if name not in kwargs:
                setattr(cfg, name, None)
        cfg.validate(file)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The ``cfg.json`` dict: SAELens v6 keys, ours for ``kronsae``, unknown keys kept."""
        out: dict[str, Any] = dict(copy.deepcopy(self.extra))
        out.update(
            architecture=self.architecture,
            d_in=self.d_in,
            d_sae=self.d_sae,
            dtype=self.dtype,
            apply_b_dec_to_input=self.apply_b_dec_to_input,
            normalize_activations=self.normalize_activations,
        )
        if self.normalize_activations == "expected_average_only_in":
            out["norm_scaling_factor"] = self.norm_scaling_factor
        if self.architecture in ("topk", "kronsae"):
            out["k"] = self.k
        if self.architecture == "topk":
            out["rescale_acts_by_decoder_norm"] = self.rescale_acts_by_decoder_norm
        if self.architecture == "kronsae":
            out.update(h=self.h, m=self.m, n=self.n, composition=self.composition)
        out["metadata"] = copy.deepcopy(self.metadata)
        return out

    # -- conveniences -----------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def model_name(self) -> str | None:
        return self.metadata.get("model_name")

    @property
    def hook_name(self) -> str | None:
        return self.metadata.get("hook_name")

    @property
    def encoder_width(self) -> int:
        """Columns of ``W_enc``: ``h*(m+n)`` for KronSAE, ``d_sae`` otherwise."""
        if self.architecture == "kronsae":
            assert self.h and self.m and self.n
            return self.h * (self.m + self.n)
        return self.d_sae
