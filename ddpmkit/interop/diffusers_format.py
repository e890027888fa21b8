"""diffusers' UNet2DModel and DDPMScheduler <-> ddpmkit's UNet and `diffusion` config, exactly.

The DDPM authors' checkpoints (google/ddpm-cifar10-32, -celebahq-256, -church-256,
-bedroom-256, -cat-256) reach users as diffusers folders: a `UNet2DModel` config.json with
`diffusion_pytorch_model.safetensors` (or `.bin`) and a `DDPMScheduler` scheduler_config.json.
Their network is ddpmkit's UNet (both are Ho et al.'s network):
- the sinusoidal embedding with `freq_shift 1`, `flip_sin_to_cos false` is ddpmkit's
  [sin, cos] with frequencies exp(-ln(1e4) k / (d/2 - 1));
- `downsample_padding 0` is ddpmkit's pad (0, 1, 0, 1) before the stride-2 convolution;
- single-head attention (`attention_head_dim` null: one head of all C channels, scale
  1/sqrt(C)) with separate `to_q / to_k / to_v` Linear layers is ddpmkit's one qkv 1x1
  convolution, the three weight matrices stacked in that order;
- GroupNorm eps is a config value either way (the Google models use 1e-6).
Everything else a UNet2DModel config can say (other block types, class conditioning,
scale-shift time embedding, multi-head attention, ...) is refused with one line naming the key.

Symbols: L levels (len(block_out_channels)), R residual blocks per level (layers_per_block),
C channels. ddpmkit's down level i is diffusers' down_blocks[i]; its up level i is
up_blocks[L - 1 - i] (diffusers numbers up blocks in the order they run).

diffusers is not imported: its configs are JSON, and this module holds the defaults of
diffusers 0.42's UNet2DModel for keys a config.json omits.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ddpmkit.errors import UserError

log = logging.getLogger(__name__)

UNET_CLASS = "UNet2DModel"
# Written into exported configs; diffusers only reads it for a few legacy pipelines.
DIFFUSERS_VERSION = "0.25.0"

# diffusers' UNet2DModel defaults: a config.json that omits a key gets this value from diffusers,
# so an omitted key is checked like a written one.
UNET_DEFAULTS: Mapping[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8,
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}

# Settings ddpmkit's UNet has one way of doing: key -> (accepted values, what ddpmkit does).
UNET_FIXED: Mapping[str, tuple[tuple[Any, ...], str]] = {
    "center_input_sample": ((False,), "feeds x_t in unscaled"),
    "time_embedding_type": (("positional",), "uses the sinusoidal (positional) embedding"),
    "freq_shift": ((1,), "uses the frequencies exp(-ln(1e4) k / (d/2 - 1)) (freq_shift 1)"),
    "flip_sin_to_cos": ((False,), "orders its time embedding [sin, cos]"),
    "mid_block_type": (("UNetMidBlock2D",), "has a middle block (res, attention, res)"),
    "mid_block_scale_factor": ((1,), "does not rescale its middle block"),
    "downsample_padding": ((0,), "pads right and bottom before a stride-2 conv (TF 'SAME')"),
    "downsample_type": (("conv",), "downsamples with a stride-2 convolution"),
    "upsample_type": (("conv",), "upsamples with nearest neighbour + convolution"),
    "act_fn": (("silu", "swish"), "uses SiLU"),
    "resnet_time_scale_shift": (("default",), "adds the time embedding (no scale-shift norm)"),
    "add_attention": ((True,), "has attention in its middle block"),
    "class_embed_type": ((None,), "is unconditional"),
    "num_class_embeds": ((None,), "is unconditional"),
}
# Block types that map, and whether they hold attention. diffusers strips a "UNetRes" prefix.
DOWN_BLOCKS = {"DownBlock2D": False, "AttnDownBlock2D": True}
UP_BLOCKS = {"UpBlock2D": False, "AttnUpBlock2D": True}


def _refuse(source: str, message: str) -> UserError:
    return UserError(f"{source}: {message}; only unconditional DDPM UNets (as in "
                     "google/ddpm-cifar10-32) map onto ddpmkit's UNet")


def _attention_levels(c: Mapping[str, Any], source: str) -> list[bool]:
    """Per level, whether it holds attention; the down and up paths must agree."""
    levels = len(c["block_out_channels"])
    found = []
    for key, table in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
        types = [t[len("UNetRes"):] if t.startswith("UNetRes") else t for t in c[key]]
        if len(types) != levels:
            raise _refuse(source, f"{key} has {len(types)} entries for {levels} "
                                  "block_out_channels")
        unknown = sorted({t for t in types if t not in table})
        if unknown:
            raise _refuse(source, f"{key} holds {', '.join(unknown)} (ddpmkit maps only "
                                  f"{' and '.join(table)})")
        found.append([table[t] for t in types])
    down, up = found[0], found[1][::-1]
    if down != up:
        raise _refuse(source, f"attention sits at levels {down} going down but {up} going up")
    return down


def _check_single_head(c: Mapping[str, Any], apply_attn: Sequence[bool], source: str) -> None:
    """`attention_head_dim` null means one head of all C channels; a number must equal C."""
    head_dim = c["attention_head_dim"]
    if head_dim is None:
        return
    channels = [ch for ch, attn in zip(c["block_out_channels"], apply_attn) if attn]
    for ch in channels + [c["block_out_channels"][-1]]:  # + the middle block
        if ch != head_dim:
            raise _refuse(source, f"attention_head_dim {head_dim} makes {ch // head_dim or 1} "
                                  f"attention heads at {ch} channels, but ddpmkit's attention "
                                  "has one head (attention_head_dim null)")


def _resolution(value: Any, source: str) -> int | list[int]:
    """sample_size S or [H, W] -> S (square) or [H, W], as ddpmkit's dataset.resolution."""
    sizes = list(value) if isinstance(value, (list, tuple)) else [value]
    if not 1 <= len(sizes) <= 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes):
        raise UserError(f"{source}: sample_size {value!r} is not an image size (S or [H, W]); "
                        "set sample_size in config.json")
    return sizes[0] if sizes[0] == sizes[-1] else sizes


def model_config_from_unet(config: Mapping[str, Any], source: str = "config.json"
                           ) -> tuple[dict[str, Any], int]:
    """(ddpmkit `model` section, image resolution) for a UNet2DModel config.json.

    Keys diffusers itself does not know are ignored (with a warning), as diffusers does.
    """
    name = config.get("_class_name", UNET_CLASS)
    if name != UNET_CLASS:
        raise _refuse(source, f"the model is a {name}, not a {UNET_CLASS}")
    unknown = sorted(k for k in config if k not in UNET_DEFAULTS and not k.startswith("_"))
    if unknown:
        log.warning("%s: ignoring keys %s (unknown to diffusers' %s)", source, unknown,
                    UNET_CLASS)
    c = {**UNET_DEFAULTS, **{k: v for k, v in config.items() if k in UNET_DEFAULTS}}
    for key, (accepted, what) in UNET_FIXED.items():
        if c[key] not in accepted or isinstance(c[key], bool) != isinstance(accepted[0], bool):
            raise _refuse(source, f"{key} {c[key]!r} cannot be mapped: ddpmkit's UNet {what} "
                                  f"({key} {accepted[0]!r})")
    channels = list(c["block_out_channels"])
    if not channels or any(not isinstance(ch, int) or ch % channels[0] for ch in channels):
        raise _refuse(source, f"block_out_channels {channels} are not multiples of the first "
                              "(ddpmkit's levels have hid_channels x an integer multiplier)")
    apply_attn = _attention_levels(c, source)
    _check_single_head(c, apply_attn, source)
    groups = c["norm_num_groups"]
    if groups is None or c["attn_norm_num_groups"] not in (None, groups):
        raise _refuse(source, f"norm_num_groups {groups!r} / attn_norm_num_groups "
                              f"{c['attn_norm_num_groups']!r}: ddpmkit uses one GroupNorm "
                              "group count everywhere")
    if c["out_channels"] != c["in_channels"]:
        raise _refuse(source, f"out_channels {c['out_channels']} != in_channels "
                              f"{c['in_channels']}: the network predicts a variance too "
                              "(learned / learned_range), which ddpmkit's samplers cannot use")
    if not isinstance(c["layers_per_block"], int):
        raise _refuse(source, f"layers_per_block {c['layers_per_block']!r} is not one number")
    model = {
        "in_channels": c["in_channels"], "hid_channels": channels[0],
        "ch_multipliers": [ch // channels[0] for ch in channels],
        "num_res_blocks": c["layers_per_block"], "apply_attn": apply_attn,
        "drop_rate": float(c["dropout"]), "group_norm_eps": float(c["norm_eps"]),
        "block_size": 1, "time_embedding_dim": c["time_embedding_dim"], "num_groups": groups,
        "num_classes": None,  # class-conditioned UNet2DModels are refused above
    }
    return model, _resolution(c["sample_size"], source)


def unet_config_from_model(model_cfg: Mapping[str, Any], resolution: int | Sequence[int]
                           ) -> dict[str, Any]:
    """The UNet2DModel config.json of a ddpmkit `model` section (the inverse of the above);
    `resolution` S or (H, W) becomes sample_size S or [H, W]."""
    from ddpmkit.models.unet import MODEL_DEFAULTS

    m = {**MODEL_DEFAULTS, **model_cfg}
    if m.get("num_classes"):
        raise UserError("a class-conditional model has no DDPMPipeline equivalent; export it "
                        "with --format safetensors")
    if m["block_size"] != 1:
        raise UserError(f"block_size {m['block_size']} (pixel shuffle) has no UNet2DModel "
                        "equivalent; only block_size 1 models export to diffusers")
    levels = len(m["ch_multipliers"])
    attn = m["apply_attn"]
    attn = [attn] * levels if isinstance(attn, bool) else list(attn)
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    config = {"_class_name": UNET_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
              **{k: v for k, v in UNET_DEFAULTS.items()}}
    config.update({key: accepted[0] for key, (accepted, _) in UNET_FIXED.items()})
    config.update({
        "sample_size": _resolution(resolution, "the model's image size"),
        "in_channels": m["in_channels"],
        "out_channels": m["in_channels"], "time_embedding_dim": m["time_embedding_dim"],
        "down_block_types": down, "up_block_types": up,
        "block_out_channels": [m["hid_channels"] * k for k in m["ch_multipliers"]],
        "layers_per_block": m["num_res_blocks"], "dropout": float(m["drop_rate"]),
        "attention_head_dim": None, "norm_num_groups": m["num_groups"],
        "attn_norm_num_groups": None, "norm_eps": float(m["group_norm_eps"]),
    })
    return config


# ---- weights -----------------------------------------------------------------------------
# diffusers < 0.15 named the attention layers query / key / value / proj_attn (the Google
# checkpoints may still); diffusers renames them on load, and so does this module.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v",
                          "proj_attn": "to_out.0"}


@dataclass(frozen=True)
class TensorRule:
    """One ddpmkit tensor and the diffusers tensor(s) it is made of, with both conversions."""
    ours: str
    theirs: tuple[str, ...]
    to_ours: Callable[[list[torch.Tensor]], torch.Tensor]
    to_theirs: Callable[[torch.Tensor], list[torch.Tensor]]
    optional: bool = False  # residual shortcuts exist only where the channel count changes


def _same(ts):
    return ts[0]


def _one(t):
    return [t]


def _plain(ours: str, theirs: str, optional: bool = False) -> list[TensorRule]:
    return [TensorRule(f"{ours}.{p}", (f"{theirs}.{p}",), _same, _one, optional)
            for p in ("weight", "bias")]


def _resblock(ours: str, theirs: str) -> list[TensorRule]:
    pairs = (("norm1", "norm1"), ("conv1", "conv1"), ("fc", "time_emb_proj"),
             ("norm2", "norm2"), ("conv2", "conv2"))
    rules = [r for o, t in pairs for r in _plain(f"{ours}.{o}", f"{theirs}.{t}")]
    return rules + _plain(f"{ours}.skip", f"{theirs}.conv_shortcut", optional=True)


def _attention(ours: str, theirs: str) -> list[TensorRule]:
    """qkv: one (3C, C, 1, 1) conv <-> three (C, C) Linear layers; out: (C, C, 1, 1) <-> (C, C)."""
    qkv = tuple(f"{theirs}.{n}" for n in ("to_q", "to_k", "to_v"))
    return [
        *_plain(f"{ours}.norm", f"{theirs}.group_norm"),
        TensorRule(f"{ours}.project_in.weight", tuple(f"{n}.weight" for n in qkv),
                   lambda ts: torch.cat(ts)[:, :, None, None],  # (3C, C, 1, 1)
                   lambda t: list(t[:, :, 0, 0].chunk(3))),
        TensorRule(f"{ours}.project_in.bias", tuple(f"{n}.bias" for n in qkv),
                   torch.cat, lambda t: list(t.chunk(3))),
        TensorRule(f"{ours}.project_out.weight", (f"{theirs}.to_out.0.weight",),
                   lambda ts: ts[0][:, :, None, None], lambda t: [t[:, :, 0, 0]]),
        TensorRule(f"{ours}.project_out.bias", (f"{theirs}.to_out.0.bias",), _same, _one),
    ]


def _level_blocks(ours: str, theirs: str, count: int, attn: bool) -> list[TensorRule]:
    rules = []
    for j in range(count):
        if attn:  # ddpmkit wraps (res, attn) in a Sequential: children 0 and 1
            rules += _resblock(f"{ours}.{j}.0", f"{theirs}.resnets.{j}")
            rules += _attention(f"{ours}.{j}.1", f"{theirs}.attentions.{j}")
        else:
            rules += _resblock(f"{ours}.{j}", f"{theirs}.resnets.{j}")
    return rules


def tensor_rules(num_res_blocks: int, apply_attn: Sequence[bool]) -> list[TensorRule]:
    """Every tensor of the UNet with R = num_res_blocks and attention per level, both names."""
    L, R = len(apply_attn), num_res_blocks
    rules = [*_plain("embed.0", "time_embedding.linear_1"),
             *_plain("embed.2", "time_embedding.linear_2"), *_plain("in_conv", "conv_in")]
    for i in range(L):
        rules += _level_blocks(f"downsamples.level_{i}", f"down_blocks.{i}", R, apply_attn[i])
        if i != L - 1:  # Downsample = (pad, conv): the conv is child 1
            rules += _plain(f"downsamples.level_{i}.{R}.1", f"down_blocks.{i}.downsamplers.0.conv")
    rules += [*_resblock("middle.0", "mid_block.resnets.0"),
              *_attention("middle.1", "mid_block.attentions.0"),
              *_resblock("middle.2", "mid_block.resnets.1")]
    for i in range(L):
        theirs = f"up_blocks.{L - 1 - i}"
        rules += _level_blocks(f"upsamples.level_{i}", theirs, R + 1, apply_attn[i])
        if i != 0:  # Upsample = (nearest x2, conv): the conv is child 1
            rules += _plain(f"upsamples.level_{i}.{R + 1}.1", f"{theirs}.upsamplers.0.conv")
    return rules + [*_plain("out_conv.0", "conv_norm_out"), *_plain("out_conv.2", "conv_out")]


def rename_legacy_attention(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`...attentions.j.query.weight` -> `...attentions.j.to_q.weight` (as diffusers does)."""
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-2] in LEGACY_ATTENTION_NAMES and "attentions" in parts:
            key = ".".join(parts[:-2] + [LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
        out[key] = value
    return out


def _few(keys: Sequence[str], shown: int = 4) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def _convert(state_dict: Mapping[str, torch.Tensor], rules: Sequence[TensorRule],
             to_ours: bool, source: str) -> dict[str, torch.Tensor]:
    remaining = dict(state_dict)
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for rule in rules:
        keys = rule.theirs if to_ours else (rule.ours,)
        absent = [k for k in keys if k not in remaining]
        if absent:
            if not (rule.optional and len(absent) == len(keys)):
                missing += absent
            continue
        tensors = [remaining.pop(k) for k in keys]
        try:
            if to_ours:
                out[rule.ours] = rule.to_ours(tensors)
            else:
                out.update(zip(rule.theirs, (t.contiguous().clone()
                                             for t in rule.to_theirs(tensors[0]))))
        except (RuntimeError, IndexError) as exc:
            raise UserError(f"{source}: tensors {', '.join(keys)} have inconsistent shapes "
                            f"({exc})") from exc
    if missing or remaining:
        problems = [f"{len(missing)} missing tensor(s): {_few(missing)}"] if missing else []
        if remaining:
            problems.append(f"{len(remaining)} unexpected tensor(s): {_few(sorted(remaining))}")
        raise UserError(f"{source}: the weights do not fit the network its config describes: "
                        + "; ".join(problems))
    return out


def state_dict_from_diffusers(state_dict: Mapping[str, torch.Tensor],
                              model_cfg: Mapping[str, Any], source: str = "weights"
                              ) -> dict[str, torch.Tensor]:
    """diffusers UNet2DModel tensors -> ddpmkit UNet tensors (the `model` section's layout)."""
    rules = tensor_rules(model_cfg["num_res_blocks"], model_cfg["apply_attn"])
    return _convert(rename_legacy_attention(state_dict), rules, to_ours=True, source=source)


def state_dict_to_diffusers(state_dict: Mapping[str, torch.Tensor],
                            model_cfg: Mapping[str, Any], source: str = "checkpoint"
                            ) -> dict[str, torch.Tensor]:
    """ddpmkit UNet tensors -> diffusers UNet2DModel tensors (new-style attention names)."""
    attn = model_cfg["apply_attn"]
    attn = [attn] * len(model_cfg["ch_multipliers"]) if isinstance(attn, bool) else list(attn)
    rules = tensor_rules(model_cfg["num_res_blocks"], attn)
    return _convert(state_dict, rules, to_ours=False, source=source)
