"""KVDeepSpeedStrategy: Lightning's DeepSpeedStrategy with ZeRO presets, on GPUs and on CPU.

Lightning refuses DeepSpeed on a CPU accelerator; DeepSpeed itself trains on CPU with its CPU
accelerator and the gloo backend. This strategy lifts that refusal so the code path CI runs on CPU is
the one production runs on GPUs. Everything else is Lightning's: checkpoints are DeepSpeed's sharded
folders, `Trainer(devices=N, num_nodes=M)` launches the ranks.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy, StrategyRegistry
from lightning.fabric.utilities.distributed import _destroy_dist_connection
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies.ddp import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn

from kvtrain.kv import attach, attached_spec


@dataclass(frozen=True)
class ZeroPreset:
    stage: int
    offload: bool = False  # optimizer state and parameters live in CPU memory between uses


PRESETS = {"zero2": ZeroPreset(2), "zero3": ZeroPreset(3), "zero3_offload": ZeroPreset(3, offload=True)}


def require_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError("the DeepSpeed strategies need deepspeed: `pip install 'kvtrain[deepspeed]'`")


def auto_bucket_sizes(hidden_size: int) -> dict[str, int]:
    """ZeRO bucket and persistence sizes scaled to the model, as transformers' DeepSpeed "auto" does.

    Lightning's fixed 2e8-element buckets would allocate 800 MB of fp32 gradient buffer for any
    model, and ZeRO-3's default persistence threshold (1e5) would leave every matrix of a small
    model unpartitioned.
    """
    square = hidden_size * hidden_size
    return {
        "reduce_bucket_size": square,
        "allgather_bucket_size": square,
        "stage3_prefetch_bucket_size": int(0.9 * square),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }


class KVDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO through Lightning, selected by preset: `trainer.strategy: zero3` in a recipe.

    Args:
        preset: "zero2" (optimizer state and gradients sharded), "zero3" (parameters too) or
            "zero3_offload" (ZeRO-3 with optimizer state and parameters offloaded to CPU memory).
        bucket_size: elements per ZeRO communication bucket; None sizes them to the model
            (hidden_size**2) when fit starts.
        config: extra DeepSpeed config entries, merged over the preset's.
        process_group_backend: "nccl" on GPUs and "gloo" on CPU by default.
        **kwargs: any other `lightning.pytorch.strategies.DeepSpeedStrategy` argument.
    """

    strategy_name = "kvtrain_deepspeed"

    def __init__(
        self,
        preset: str = "zero2",
        bucket_size: int | None = None,
        config: dict[str, Any] | None = None,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ):
        if preset not in PRESETS:
            raise ValueError(f"unknown DeepSpeed preset {preset!r}; choose one of {sorted(PRESETS)}")
        if bucket_size is not None and bucket_size < 1:
            raise ValueError(f"bucket_size must be a positive number of elements, got {bucket_size}")
        require_deepspeed()
        zero = PRESETS[preset]
        super().__init__(
            stage=zero.stage,
            offload_optimizer=zero.offload,
            offload_parameters=zero.offload,
            process_group_backend=process_group_backend,
            **kwargs,
        )
        self.preset, self.bucket_size, self.extra_config = preset, bucket_size, dict(config or {})

    def setup_environment(self) -> None:
        # torch deprecated the collectives DeepSpeed calls every step; one warning per call otherwise.
        warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
        if isinstance(self.accelerator, CUDAAccelerator):
            return super().setup_environment()
        if not isinstance(self.accelerator, CPUAccelerator):
            raise RuntimeError(f"KVDeepSpeedStrategy runs on CUDA GPUs or CPU, not {type(self.accelerator).__name__}")
        # DeepSpeed picks its accelerator once, at first use: pin it before anything imports it.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own would refuse the CPU

    def setup_distributed(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            return super().setup_distributed()
        reset_seed()  # as Lightning's, minus its check of CUDA device indices (CPU devices have none)
        self.set_world_ranks()
        self._init_deepspeed_distributed()
        # Lightning destroys only NCCL groups at exit; a gloo group left to interpreter shutdown can abort
        # a rank after its fit has finished ("terminate called without an active exception").
        atexit.unregister(_destroy_dist_connection)  # once, however many times the trainer sets up
        atexit.register(_destroy_dist_connection)

    def setup(self, trainer) -> None:
        check_zero3_features(self.lightning_module, self.preset)
        super().setup(trainer)

    def _format_config(self) -> None:
        super()._format_config()
        zero = self.config.setdefault("zero_optimization", {})
        hidden = _hidden_size(self.lightning_module)
        if self.bucket_size is not None:
            zero.update(reduce_bucket_size=self.bucket_size, allgather_bucket_size=self.bucket_size)
        elif hidden is not None:
            zero.update(auto_bucket_sizes(hidden))
        if PRESETS[self.preset].offload:
            # The LightningModule's own optimizer (e.g. torch AdamW) steps on the offloaded fp32 state;
            # DeepSpeed would otherwise demand its compiled DeepSpeedCPUAdam.
            self.config["zero_force_ds_cpu_optimizer"] = False
        _merge(self.config, self.extra_config)

    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Lightning has already divided the loss by accumulate_grad_batches; DeepSpeed's engine would
        # divide it again, shrinking every accumulated gradient (and changing what clipping does).
        kwargs.setdefault("scale_wrt_gas", False)
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        if self.zero_stage_3 and not fitting and Path(checkpoint_path).is_dir():
            # DeepSpeed's inference engine has no optimizer to restore ZeRO-3 shards into (it raises):
            # consolidate them, and Lightning's full-weights path scatters them to the partitions.
            self.load_full_weights = True
            return consolidated_checkpoint(checkpoint_path)
        with weights_only_loads():
            return super().load_checkpoint(checkpoint_path, weights_only)

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        with self._indexed_cpu_devices():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    def _initialize_deepspeed_inference(self, model: torch.nn.Module) -> None:
        # Lightning strips every module hook before wrapping for validate/test, the KV view's included.
        spec = _attached_spec_or_none(model)
        with self._indexed_cpu_devices():
            super()._initialize_deepspeed_inference(model)
        if spec is not None:
            attach(self.lightning_module, spec)

    @contextmanager
    def _indexed_cpu_devices(self) -> Iterator[None]:
        """Lightning hands DeepSpeed `root_device.index` as the rank's device, which is None on CPU."""
        devices = self.parallel_devices
        if devices and all(d.type == "cpu" for d in devices):
            self.parallel_devices = [torch.device("cpu", i) for i in range(len(devices))]
        try:
            yield
        finally:
            self.parallel_devices = devices

    @classmethod
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
        for name, zero in PRESETS.items():
            description = f"kvtrain: DeepSpeed ZeRO-{zero.stage}" + (" with CPU offload" if zero.offload else "")
            strategy_registry.register(name, cls, description=description, override=True, preset=name)


def check_zero3_features(module: torch.nn.Module | None, preset: str) -> None:
    """Refuse, by name, features that ZeRO-3's parameter partitioning cannot carry."""
    if module is None or PRESETS[preset].stage != 3:
        return
    if getattr(getattr(module, "hparams", {}), "get", lambda *_: None)("qlora"):
        raise ValueError(
            f"qlora cannot run under {preset}: ZeRO-3 partitions parameters, and bitsandbytes' 4-bit "
            "weights carry quantization state that partitioning would split; use trainer.strategy: zero2"
        )


def _hidden_size(module: torch.nn.Module | None) -> int | None:
    from kvtrain.kv.attention import hf_model

    if module is None:
        return None
    try:
        config = hf_model(module).config.get_text_config(decoder=True)
    except TypeError:
        return None
    return getattr(config, "hidden_size", None)


def _attached_spec_or_none(model: torch.nn.Module):
    try:
        return attached_spec(model)
    except TypeError:  # no Hugging Face model inside: nothing can be attached
        return None


def _merge(into: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


KVDeepSpeedStrategy.register_strategies(StrategyRegistry)


@contextmanager
def full_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block every ZeRO-3-partitioned parameter of `module` is whole on every rank.

    Collective: all ranks must enter together. A no-op for models ZeRO-3 has not partitioned.
    """
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """DeepSpeed reads its checkpoint files with `torch.load(weights_only=False)`; inside this block
    they load as data only, with just the DeepSpeed types those files hold allowed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def consolidated_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """A DeepSpeed (ZeRO-2 or ZeRO-3, any number of ranks) checkpoint folder as one Lightning
    checkpoint dict: fp32 `state_dict` gathered from the shards, plus the Lightning state
    (hyper_parameters, callbacks, loops)."""
    require_deepspeed()
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    if not (Path(folder) / "latest").is_file():
        raise FileNotFoundError(f"{folder} is not a DeepSpeed checkpoint folder (it has no 'latest' file)")
    with tempfile.TemporaryDirectory() as tmp, weights_only_loads(), redirect_stdout(sys.stderr):
        return convert_zero_checkpoint_to_fp32_state_dict(folder, Path(tmp) / "consolidated.ckpt")
