"""Per-prompt POPI gradients: three engines for the same loss (:mod:`cropi_pl.influence.popi`).

* "hooks": one ordinary forward/backward of the distinct responses of all prompts of a batch as
  (R, T) rows (no padding rows) under the SUM of the per-prompt losses (rows never interact, so
  each row's activation gradients are its own prompt's). Module hooks capture every layer's input
  and output gradient and each prompt's weight gradient is summed over its own rows only
  (``_rule``: Linear, Embedding, RMSNorm). With ``POPIConfig.share_prompt_cache`` the rows run
  as two forwards, the prompts once and the completions against their cached keys and values;
  each forward's calls are summed with that forward's layout.
* "vmap": ``torch.func.vmap`` over prompts of ``torch.func.grad`` of the per-prompt loss.
* "loop": one ``torch.autograd.grad`` per prompt (the reference).
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from cropi_pl.influence.popi import (
    Block,
    POPIConfig,
    batch_loss,
    block_logits,
    collate,
    gradient_mode,
    logits_of,
    plan_batches,
    prompt_loss,
    prompt_rows,
    vocab_size_of,
)
from cropi_pl.influence.projection import SparseProjector
from cropi_pl.influence.trajectories import PromptTrajectories

Method = Literal["loop", "vmap", "hooks"]
_METHODS = ("loop", "vmap", "hooks")


class HookedCalls(NamedTuple):
    """Every call's (first input, output gradient, forward) of the hooked modules in the
    forwards and one backward of a block, and per forward the token rows (flattened leading
    dims) each prompt owns."""

    calls: dict[str, list[tuple[Tensor, Tensor, int]]]
    sizes: list[list[int]]

    def merged(self) -> HookedCalls:
        """The same calls with every forward's tokens owned by one prompt: per-prompt rules then
        give the batch's summed gradient (1, ...)."""
        return HookedCalls(self.calls, [[sum(sizes)] for sizes in self.sizes])


def hooked_backward(
    model: nn.Module, modules: dict[str, nn.Module], block: Block, config: POPIConfig
) -> HookedCalls:
    """One backward of ``batch_loss`` over the block's real (R, T) rows, run as one forward or,
    with ``config.share_prompt_cache``, as a forward of the prompts and one of the completions, with
    the (first input, output gradient) of every call of each of ``modules``. Parameter gradients
    are never accumulated: autograd only differentiates down to the hooked outputs. The tensors
    keep the dtypes the pass ran in; each consumer chooses the precision of its per-prompt sums."""
    inputs: dict[str, list[tuple[Tensor, int]]] = {name: [] for name in modules}
    outputs: dict[str, list[Tensor]] = {name: [] for name in modules}
    forwards: list[None] = []  # one entry per forward of ``model`` so far

    def capture(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            inputs[name].append((args[0].detach(), len(forwards) - 1))
            outputs[name].append(output)

        return hook

    handles = [
        model.register_forward_pre_hook(lambda *_: forwards.append(None)),
        *(m.register_forward_hook(capture(n)) for n, m in modules.items()),
    ]
    rows = prompt_rows(block)
    try:
        logits, shared = block_logits(model, block, config)
    finally:
        for handle in handles:
            handle.remove()
    hooked = [y for name in modules for y in outputs[name]]
    out_grads = iter(torch.autograd.grad(batch_loss(logits, block, rows, config), hooked))
    calls = {name: [(x, next(out_grads), f) for x, f in inputs[name]] for name in modules}
    if shared is not None:
        span = shared.completion_ids.shape[1]
        sizes = [[shared.prompt_ids.shape[1]] * len(rows), [u * span for u in rows]]
    else:
        sizes = [[u * block.input_ids.shape[-1] for u in rows]]
    return HookedCalls(calls, sizes)


# A rule adds one call's (input, output gradient) of (R, T, ...) rows, prompt j owning the next
# sizes[j] of the R*T token rows, to the per-prompt gradients (p, *shape) of the module's own
# parameters in ``into`` (keyed by attribute name, created by the module's first call): a module
# called several times (a prompt forward and a completion forward) sums in place.
_Rule = Callable[[nn.Module, Tensor, Tensor, list[int], dict[str, Tensor]], None]


def _summable(x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Under autocast the per-prompt matmuls run in the autocast dtype with fp32 accumulation,
    like the pass itself (both cast once here, not once per prompt); otherwise in float32, so a
    bf16 model's per-prompt sums still accumulate in float32."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return x.to(dtype), g.to(dtype)
    return x.float(), g.float()


def segment_outer(g: Tensor, x: Tensor, sizes: list[int], out: Tensor | None = None) -> Tensor:
    """``out`` (p, m, n; zeros if None) plus, per prompt, the sum over its token rows of
    outer(g_t, x_t), from (..., m) and (..., n) rows that prompts own ``sizes`` at a time: one
    batched matmul per run of equal consecutive sizes (``plan_batches`` puts a batch's prompts of
    equal size side by side), added in place (no per-run pieces to concatenate)."""
    g, x = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    if out is None:
        out = g.new_zeros(len(sizes), g.shape[-1], x.shape[-1])
    start, first = 0, 0
    for size, run in itertools.groupby(sizes):
        n = len(list(run))
        rows = slice(start, start + n * size)
        out[first : first + n].baddbmm_(
            g[rows].reshape(n, size, -1).transpose(1, 2), x[rows].reshape(n, size, -1)
        )
        start, first = start + n * size, first + n
    return out


def _owners(sizes: list[int], device: torch.device) -> Tensor:
    """(sum(sizes),) long: the prompt owning each token row."""
    counts = torch.tensor(sizes, device=device)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), counts)


def _segment_sum(values: Tensor, sizes: list[int], out: Tensor | None = None) -> Tensor:
    """``out`` (p, n) float32 (zeros if None) plus each prompt's sum of its token rows of
    (..., n) ``values``."""
    values = values.float().reshape(-1, values.shape[-1])
    if out is None:
        out = values.new_zeros(len(sizes), values.shape[-1])
    return out.index_add_(0, _owners(sizes, values.device), values)


def _linear_rule(
    module: nn.Module, x: Tensor, g: Tensor, sizes: list[int], into: dict[str, Tensor]
) -> None:
    """y = x W^T + b: dW = sum over the prompt's tokens of g x^T, db = sum of g."""
    x, g = _summable(x, g)
    into["weight"] = segment_outer(g, x, sizes, into.get("weight"))
    if module.bias is not None:
        into["bias"] = _segment_sum(g, sizes, into.get("bias"))


def _embedding_rule(
    module: nn.Module, ids: Tensor, g: Tensor, sizes: list[int], into: dict[str, Tensor]
) -> None:
    """Row v of the table gets the sum of g over the prompt's tokens equal to v, except the
    padding row, which ``nn.Embedding`` never updates."""
    vocab, width = module.weight.shape
    ids = ids.reshape(-1)
    index = ids + vocab * _owners(sizes, ids.device)
    g = g.float().reshape(-1, width)  # index_add_ adds row by row: accumulate in float32
    if module.padding_idx is not None:
        keep = ids != module.padding_idx
        index, g = index[keep], g[keep]
    if "weight" not in into:
        into["weight"] = g.new_zeros(len(sizes), vocab, width)
    into["weight"].view(-1, width).index_add_(0, index, g)


def _rms_norm_rule(
    module: nn.Module, x: Tensor, g: Tensor, sizes: list[int], into: dict[str, Tensor]
) -> None:
    """HF Llama-family RMSNorm, y = w * (x / rms(x)) computed in float32: dw = sum of g * x/rms."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    into["weight"] = _segment_sum(g.float() * normed, sizes, into.get("weight"))


def _rule(module: nn.Module) -> _Rule | None:
    """The per-prompt gradient rule of ``module``'s own parameters, None if it has none."""
    if isinstance(module, nn.Linear):
        return _linear_rule
    if isinstance(module, nn.Embedding) and module.max_norm is None:
        return None if module.scale_grad_by_freq else _embedding_rule
    names = {name for name, _ in module.named_parameters(recurse=False)}
    if names == {"weight"} and hasattr(module, "variance_epsilon") and module.weight.dim() == 1:
        return _rms_norm_rule
    return None


class POPIGradients:
    """Per-prompt POPI gradients of ``model``, ``prompts_per_batch`` prompts per backward pass.

    The flat layout of a gradient vector is the order of ``named_parameters()`` restricted to
    trainable parameters matching ``config.param_filter``; ``param_names``/``offsets`` describe it.
    Gradients are returned in float32 (the backward runs in the model's dtype; log-probs and the
    loss are always float32). Under vmap, PyTorch has no batching rule for the fused SDPA kernels
    and loops over prompts for the attention op alone; eager attention batches fully (faster for
    short sequences, O(T^2) memory per head), so the attention implementation is left to the caller.

    ``method`` (module doc): None picks "vmap" on CUDA and "loop" elsewhere. On the 2-core CPU
    "hooks" is now the faster float32 engine on the embedded policy (``tools/bench_influence.py``,
    one thread: 9.6 s against 12.0 s for the 1,200-prompt pool, best of three passes 8.9 against
    12.8 s), but it holds ``prompts_per_batch`` per-prompt gradients at a time where the loop holds
    one: for SmolLM2-135M, 8 of them are 4.3 GB. So the loop stays the default; configs that know
    their model choose "hooks" (``configs/cropi_tiny.yaml``, under bf16 autocast with eager
    attention, where its batched matmuls are what the bf16 units pay for).
    "hooks" sees a parameter only through its modules' forward calls: a model that uses a weight
    functionally elsewhere needs "loop" or "vmap". A model that fails under vmap falls back to
    "loop" with a warning.
    """

    def __init__(
        self,
        model: nn.Module,
        config: POPIConfig,
        prompts_per_batch: int = 8,
        method: Method | None = None,
    ) -> None:
        if prompts_per_batch < 1:
            raise ValueError(f"prompts_per_batch must be >= 1, got {prompts_per_batch}")
        if method is not None and method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS} or None, got {method!r}")
        self.model = model
        self.config = config
        self.prompts_per_batch = prompts_per_batch
        pattern = re.compile(config.param_filter) if config.param_filter is not None else None
        self._params = {
            name: p
            for name, p in model.named_parameters()
            if p.requires_grad and (pattern is None or pattern.search(name))
        }
        if not self._params:
            raise ValueError(
                f"param_filter {config.param_filter!r} matches no trainable parameter of "
                f"{type(model).__name__}"
            )
        self.param_names: list[str] = list(self._params)
        self.offsets: dict[str, int] = {}
        total = 0
        for name, p in self._params.items():
            self.offsets[name] = total
            total += p.numel()
        self.num_params: int = total
        self._vocab_size = vocab_size_of(model)
        if method is None:
            method = "vmap" if self._device().type == "cuda" else "loop"
        self._hooked, unsupported = self._hook_plan()
        if config.share_prompt_cache and method != "hooks":
            raise ValueError(
                f"popi.share_prompt_cache is an option of method='hooks', got method={method!r}"
            )
        if method == "hooks" and unsupported:
            raise ValueError(
                f"method='hooks' has no per-prompt gradient rule for {unsupported[:3]}; "
                "use method='loop' or 'vmap', or a param_filter that excludes them"
            )
        self.method: Method = method

    def _hook_plan(self) -> tuple[dict[str, tuple[nn.Module, dict[str, str]]], list[str]]:
        """Modules owning selected parameters, each with {attribute: flat-layout name} (a tied
        weight appears under every module that owns it), and the selected parameters that some
        owner has no rule for ("module (type)")."""
        names = {id(p): name for name, p in self._params.items()}
        hooked: dict[str, tuple[nn.Module, dict[str, str]]] = {}
        unsupported: list[str] = []
        for module_name, module in self.model.named_modules():
            owned = {
                attr: names[id(p)]
                for attr, p in module.named_parameters(recurse=False, remove_duplicate=False)
                if id(p) in names
            }
            if not owned:
                continue
            if _rule(module) is None:
                unsupported.append(f"{module_name} ({type(module).__name__})")
            else:
                hooked[module_name] = (module, owned)
        return hooked, unsupported

    @property
    def _prompts_per_forward(self) -> int:
        """One for "loop" (it runs one backward per prompt anyway), else ``prompts_per_batch``."""
        return 1 if self.method == "loop" else self.prompts_per_batch

    def compute_pieces(
        self, trajs: Sequence[PromptTrajectories]
    ) -> Iterator[tuple[list[int], str, int, Tensor]]:
        """Yield (indices into trajs, parameter name, flat offset, (p, numel) float32 gradients).

        Only prompts with a non-zero gradient are computed. Prompts are batched in order of
        sequence length to limit padding, so indices are not monotone across batches. The
        "loop" method takes one prompt per batch (it runs one backward per prompt anyway), so at
        most ``prompts_per_batch`` (one, for "loop") full gradients exist at a time.
        """
        with gradient_mode(self.model, self.config):
            for indices in plan_batches(trajs, self._vocab_size, self._prompts_per_forward):
                grads = self._batch_grads([trajs[i] for i in indices])
                for name in self.param_names:
                    piece = grads.pop(name).reshape(len(indices), -1).float()
                    yield indices, name, self.offsets[name], piece

    def summed_pieces(
        self, trajs: Sequence[PromptTrajectories]
    ) -> Iterator[tuple[list[int], str, int, Tensor]]:
        """Like ``compute_pieces`` but each batch's gradients summed over its prompts, (1, numel):
        one ordinary forward/backward of the summed per-prompt losses per batch (of one prompt
        for "loop", whose memory is one prompt's activations, else ``prompts_per_batch``) and no
        per-prompt gradient, whatever the method. A mean of projected gradients is the projection
        of this sum (projections are linear)."""
        params, device = list(self._params.values()), self._device()
        with gradient_mode(self.model, self.config):
            for indices in plan_batches(trajs, self._vocab_size, self._prompts_per_forward):
                block = collate([trajs[i] for i in indices], device, self.config.deduplicate)
                logits, _ = block_logits(self.model, block, self.config)
                loss = batch_loss(logits, block, prompt_rows(block), self.config)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for name, param, g in zip(self.param_names, params, grads, strict=True):
                    g = torch.zeros_like(param) if g is None else g  # the model never used it
                    yield indices, name, self.offsets[name], g.reshape(1, -1).float()

    def project(
        self, trajs: Sequence[PromptTrajectories], projector: SparseProjector, summed: bool = False
    ) -> Iterator[tuple[list[int], Tensor]]:
        """Yield (indices into trajs, (p, k) float32 projections), each gradient streamed into
        ``projector`` parameter by parameter: no flat (p, num_params) gradient is assembled. With
        ``summed``, (1, k): the projection of the batch's summed gradient (``summed_pieces``)."""
        if projector.num_params != self.num_params:
            raise ValueError(
                f"projector covers {projector.num_params} coordinates, the gradients "
                f"{self.num_params}"
            )
        indices: list[int] | None = None
        state = None
        pieces = self.summed_pieces(trajs) if summed else self.compute_pieces(trajs)
        for batch_indices, _, offset, piece in pieces:
            if batch_indices is not indices:
                if indices is not None:
                    yield indices, projector.finish(state)
                indices, state = batch_indices, projector.begin(piece.shape[0])
            projector.add(state, offset, piece)
        if indices is not None:
            yield indices, projector.finish(state)

    def compute(self, trajs: Sequence[PromptTrajectories]) -> Iterator[tuple[list[int], Tensor]]:
        """Yield (indices into trajs, (p, num_params) float32 flat gradients) batch by batch."""
        indices: list[int] | None = None
        pieces: list[Tensor] = []
        for batch_indices, _, _, piece in self.compute_pieces(trajs):
            if indices is not None and batch_indices is not indices:
                yield indices, torch.cat(pieces, dim=1)
                pieces = []
            indices = batch_indices
            pieces.append(piece)
        if indices is not None:
            yield indices, torch.cat(pieces, dim=1)

    def _batch_grads(self, trajs: list[PromptTrajectories]) -> dict[str, Tensor]:
        if self.method == "hooks":
            return self._hook_grads(trajs)
        if self.method == "vmap":
            try:
                return self._vmap_grads(trajs)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:  # an op of this model has no vmap batching rule
                warnings.warn(
                    f"vmap through {type(self.model).__name__} failed ({err}); falling back to "
                    "a per-prompt torch.autograd.grad loop",
                    stacklevel=2,
                )
                self.method = "loop"
        return self._loop_grads(trajs)

    def _device(self) -> torch.device:
        return next(iter(self._params.values())).device

    def _vmap_grads(self, trajs: list[PromptTrajectories]) -> dict[str, Tensor]:
        """All prompts of the batch in one vmapped forward/backward."""
        params = {name: p.detach() for name, p in self._params.items()}
        frozen = {
            name: t.detach()
            for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]
            if name not in params
        }

        def loss(params: dict[str, Tensor], block: Block) -> Tensor:
            output = functional_call(self.model, (params, frozen), (block.input_ids,))
            return prompt_loss(logits_of(output), block, self.config)

        block = collate(trajs, self._device(), self.config.deduplicate)
        return vmap(grad(loss), in_dims=(None, 0))(params, block)

    @property
    def hooked_modules(self) -> dict[str, nn.Module]:
        """The modules whose (input, output gradient) calls ``grads_from_calls`` needs."""
        return {name: module for name, (module, _) in self._hooked.items()}

    def _hook_grads(self, trajs: list[PromptTrajectories]) -> dict[str, Tensor]:
        """All prompts of the batch in one plain forward/backward; per-prompt sums by hooks."""
        block = collate(trajs, self._device(), self.config.deduplicate)
        return self.grads_from_calls(
            hooked_backward(self.model, self.hooked_modules, block, self.config)
        )

    def grads_from_calls(self, hooked: HookedCalls) -> dict[str, Tensor]:
        """Per-prompt gradients {parameter: (p, *shape)} from ``hooked_backward``'s calls of
        (at least) ``hooked_modules``; other consumers may share the calls."""
        p = len(hooked.sizes[0])
        grads: dict[str, Tensor] = {}
        for module_name, (module, owned) in self._hooked.items():
            rule, pieces = _rule(module), {}
            for x, g, forward in hooked.calls[module_name]:
                rule(module, x, g, hooked.sizes[forward], pieces)
            for attr, piece in pieces.items():
                if attr in owned:  # a tied weight: the sum over every module that owns it
                    name = owned[attr]
                    grads[name] = grads[name] + piece if name in grads else piece
        for name, param in self._params.items():  # its module never ran: zero gradient
            if name not in grads:
                grads[name] = param.new_zeros(p, *param.shape)
        return grads

    def _loop_grads(self, trajs: list[PromptTrajectories]) -> dict[str, Tensor]:
        """Reference path: one unpadded forward/backward per prompt through the real module."""
        params = list(self._params.values())
        per_prompt = []
        for traj in trajs:
            block = Block(*(x[0] for x in collate([traj], self._device(), self.config.deduplicate)))
            loss = prompt_loss(logits_of(self.model(block.input_ids)), block, self.config)
            per_prompt.append(torch.autograd.grad(loss, params))
        return {
            name: torch.stack([g[j] for g in per_prompt]) for j, name in enumerate(self.param_names)
        }
