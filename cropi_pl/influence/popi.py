"""POPI: per-prompt off-policy policy gradients from stored trajectories (METHOD.md section 3).

CROPI scores a prompt by the gradient of its GRPO objective at the current parameters theta, but it
never samples fresh responses: the K responses stored from the behaviour policy beta are reweighted
with per-token importance ratios rho = pi_theta / beta. The gradient of one prompt is that of

    L(theta) = -(1/K) sum_i (1/|o_i|) sum_t rho_it(theta) A_i,

which at theta = beta (rho = 1) is exactly the on-policy GRPO gradient.

Three ways to get per-prompt gradients (``POPIGradients(method=...)``), all through the same loss:

* "hooks": one ordinary forward/backward of all prompts' responses as one (p*K, T) batch under the
  SUM of the per-prompt losses (rows never interact, so each row's activation gradients are its
  own prompt's). Module hooks capture every layer's input and output gradient and each prompt's
  weight gradient is summed over its own rows only (``_RULES``: Linear, Embedding, RMSNorm).
* "vmap": ``torch.func.vmap`` over prompts of ``torch.func.grad`` of the per-prompt loss.
* "loop": one ``torch.autograd.grad`` per prompt (the reference).

HF attention-mask code does not survive vmap, so sequences are RIGHT-padded (prompt, completion,
pad) and the model gets no attention mask: causal attention keeps real tokens blind to later pads,
and the loss masks the pad positions (pads get exactly zero gradient).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from cropi_pl.influence.projection import derive_seed

RatioMode = Literal["none", "clip", "truncate"]
_RATIO_MODES = ("none", "clip", "truncate")
Method = Literal["loop", "vmap", "hooks"]
_METHODS = ("loop", "vmap", "hooks")
_PAD_ID = 0  # any valid id: right pads are never attended to and never scored


@dataclass
class PromptTrajectories:
    """The K stored responses of one prompt, with beta's per-token log-probs and the rewards."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    behaviour_logps: list[list[float]]
    rewards: list[float]


@dataclass
class POPIConfig:
    """How the off-policy surrogate treats ratios and group statistics.

    ``ratio_mode``: "none" uses rho as is (the paper's default); "clip" clamps rho to
    [1 - ratio_bound, 1 + ratio_bound] (zero gradient outside, like ``torch.clamp``); "truncate"
    uses min(rho, 1 + ratio_bound) (truncated importance sampling).
    ``reweight_group_stats``: importance-weight the group mean/std of the rewards with detached
    sequence weights w_i proportional to exp(mean_t log rho_it), so the baseline estimates the
    current policy's group instead of beta's.
    ``param_filter``: regex (``re.search``) on parameter names; None = every trainable parameter.
    """

    ratio_mode: RatioMode = "none"
    ratio_bound: float = 0.2
    reweight_group_stats: bool = False
    adv_eps: float = 1e-4
    param_filter: str | None = None

    def __post_init__(self) -> None:
        if self.ratio_mode not in _RATIO_MODES:
            raise ValueError(f"ratio_mode must be one of {_RATIO_MODES}, got {self.ratio_mode!r}")
        if self.ratio_bound <= 0:
            raise ValueError(f"ratio_bound must be > 0, got {self.ratio_bound}")
        if self.ratio_mode == "clip" and self.ratio_bound >= 1:
            raise ValueError(
                f"ratio_bound must be < 1 for ratio_mode='clip' (lower clip 1 - bound), "
                f"got {self.ratio_bound}"
            )
        if self.adv_eps <= 0:
            raise ValueError(f"adv_eps must be > 0, got {self.adv_eps}")


class _Block(NamedTuple):
    """Right-padded tensors of prompts; the leading dim is dropped inside vmap."""

    input_ids: Tensor  # (..., K, T) long
    target_mask: Tensor  # (..., K, T - 1) bool: position j predicts completion token j + 1
    behaviour: Tensor  # (..., K, T - 1) float32, 0 where not a target
    rewards: Tensor  # (..., K) float32, 0 for padded responses
    row_mask: Tensor  # (..., K) bool: real (not padding) responses


def _layout(
    prompt_ids: Sequence[int], completion_ids: Sequence[Sequence[int]], length: int
) -> tuple[Tensor, Tensor]:
    """(K, length) right-padded ids of prompt+completion and the (K, length-1) target mask."""
    ids = torch.full((len(completion_ids), length), _PAD_ID, dtype=torch.long)
    target = torch.zeros(len(completion_ids), length - 1, dtype=torch.bool)
    n_prompt = len(prompt_ids)
    for i, completion in enumerate(completion_ids):
        end = n_prompt + len(completion)
        ids[i, :end] = torch.tensor([*prompt_ids, *completion], dtype=torch.long)
        target[i, n_prompt - 1 : end - 1] = True
    return ids, target


def _collate(trajs: Sequence[PromptTrajectories], device: torch.device) -> _Block:
    """Pad prompts to a common (K, T) so vmap sees equal shapes."""
    k = max(len(t.completion_ids) for t in trajs)
    length = max(len(t.prompt_ids) + max(map(len, t.completion_ids)) for t in trajs)
    ids = torch.full((len(trajs), k, length), _PAD_ID, dtype=torch.long)
    target = torch.zeros(len(trajs), k, length - 1, dtype=torch.bool)
    behaviour = torch.zeros(len(trajs), k, length - 1, dtype=torch.float32)
    rewards = torch.zeros(len(trajs), k, dtype=torch.float32)
    row_mask = torch.zeros(len(trajs), k, dtype=torch.bool)
    for j, traj in enumerate(trajs):
        n = len(traj.completion_ids)
        ids[j, :n], target[j, :n] = _layout(traj.prompt_ids, traj.completion_ids, length)
        behaviour[j, :n][target[j, :n]] = torch.tensor(
            [lp for row in traj.behaviour_logps for lp in row], dtype=torch.float32
        )
        rewards[j, :n] = torch.tensor(traj.rewards, dtype=torch.float32)
        row_mask[j, :n] = True
    return _Block(*(x.to(device) for x in (ids, target, behaviour, rewards, row_mask)))


def _check(traj: PromptTrajectories, row: int, vocab_size: int | None) -> None:
    """Fail early, naming the prompt (and response) that is malformed."""
    k = len(traj.completion_ids)
    if k == 0:
        raise ValueError(f"trajs[{row}]: no completions")
    if not traj.prompt_ids:
        raise ValueError(f"trajs[{row}]: empty prompt_ids")
    if len(traj.behaviour_logps) != k or len(traj.rewards) != k:
        raise ValueError(
            f"trajs[{row}]: {k} completions but {len(traj.behaviour_logps)} behaviour_logps rows "
            f"and {len(traj.rewards)} rewards"
        )
    for i, (completion, logps) in enumerate(
        zip(traj.completion_ids, traj.behaviour_logps, strict=True)
    ):
        if not completion:
            raise ValueError(f"trajs[{row}].completion_ids[{i}] is empty (1/|o_i| undefined)")
        if len(logps) != len(completion):
            raise ValueError(
                f"trajs[{row}].behaviour_logps[{i}] has {len(logps)} entries for "
                f"{len(completion)} completion tokens"
            )
    values = [*traj.rewards, *(lp for row in traj.behaviour_logps for lp in row)]
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"trajs[{row}]: non-finite reward or behaviour log-prob")
    if vocab_size is not None:
        tokens = [*traj.prompt_ids, *(t for c in traj.completion_ids for t in c)]
        bad = [t for t in tokens if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"trajs[{row}]: token ids {bad[:5]} outside vocab [0, {vocab_size})")


def zero_mask(trajs: Sequence[PromptTrajectories]) -> list[bool]:
    """True for prompts whose K rewards are all equal: every advantage, hence the gradient, is 0."""
    return [len(set(t.rewards)) <= 1 for t in trajs]


def _plan(
    trajs: Sequence[PromptTrajectories], vocab_size: int | None, prompts_per_batch: int
) -> list[list[int]]:
    """Validate, drop zero-gradient prompts and batch the rest in length order to limit padding."""
    for row, traj in enumerate(trajs):
        _check(traj, row, vocab_size)
    zero = zero_mask(trajs)
    order = sorted(
        (i for i in range(len(trajs)) if not zero[i]),
        key=lambda i: len(trajs[i].prompt_ids) + max(map(len, trajs[i].completion_ids)),
    )
    return [order[s : s + prompts_per_batch] for s in range(0, len(order), prompts_per_batch)]


def _vocab_size(model: nn.Module) -> int | None:
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    return getattr(embeddings, "num_embeddings", None)


def _logits(output: object) -> Tensor:
    return output.logits if hasattr(output, "logits") else output  # HF output or a plain tensor


def _token_logps(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log p(x_{j+1} | x_{<=j}) in float32 for j < T-1, without keeping a (.., T, V) log-softmax."""
    logits = logits[..., :-1, :].float()
    picked = logits.gather(-1, input_ids[..., 1:, None]).squeeze(-1)
    return picked - logits.logsumexp(-1)


def _group_advantages(rewards: Tensor, weights: Tensor, eps: float) -> Tensor:
    """(r - mean_w r) / (std_w r + eps) with weights summing to 1.

    The variance uses the reliability-weights correction 1/(1 - sum w^2), which is the unbiased
    std for uniform weights w = 1/K (the paper's A_i) and stays consistent under reweighting.
    """
    mean = (weights * rewards).sum()
    spread = (weights * (rewards - mean) ** 2).sum()
    # weights collapsed on one response leave 0/0: clamp, the advantages then just grow large
    var = spread / (1 - (weights**2).sum()).clamp_min(torch.finfo(weights.dtype).tiny)
    return (rewards - mean) / (var.sqrt() + eps)


def _prompt_loss(logits: Tensor, block: _Block, config: POPIConfig) -> Tensor:
    """The per-prompt POPI surrogate from the model's (K, T, V) logits (shared by both paths)."""
    mask = block.target_mask
    logp = _token_logps(logits, block.input_ids)
    log_rho = torch.where(mask, logp - block.behaviour, torch.zeros_like(logp))
    rho = log_rho.exp()
    if config.ratio_mode == "clip":
        rho = rho.clamp(1 - config.ratio_bound, 1 + config.ratio_bound)
    elif config.ratio_mode == "truncate":
        rho = rho.clamp(max=1 + config.ratio_bound)
    lengths = mask.sum(-1).clamp_min(1)
    k = block.row_mask.sum()
    if config.reweight_group_stats:
        seq_log_w = log_rho.detach().sum(-1) / lengths
        weights = torch.where(block.row_mask, seq_log_w, torch.full_like(seq_log_w, -torch.inf))
        weights = weights.softmax(-1)
    else:
        weights = block.row_mask.float() / k
    advantages = _group_advantages(block.rewards, weights, config.adv_eps)
    per_response = torch.where(mask, rho, torch.zeros_like(rho)).sum(-1) / lengths
    return -(per_response * advantages * block.row_mask).sum() / k


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off for the gradient pass; every submodule's mode is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.train(training)


def _batch_loss(logits: Tensor, block: _Block, config: POPIConfig) -> Tensor:
    """Sum over prompts of the per-prompt loss from (p*K, T, V) logits: a prompt's rows only
    reach its own term, so the gradient through each row is that prompt's own gradient."""
    p, k, t = block.input_ids.shape
    logits = logits.reshape(p, k, t, -1)
    return sum(_prompt_loss(logits[j], _Block(*(x[j] for x in block)), config) for j in range(p))


def _hooked_backward(
    model: nn.Module, modules: dict[str, nn.Module], block: _Block, config: POPIConfig
) -> dict[str, list[tuple[Tensor, Tensor]]]:
    """(first input, output gradient) of every call of each of ``modules`` in one forward and
    backward of the block's (p*K, T) rows under ``_batch_loss``. Parameter gradients are never
    accumulated: autograd only differentiates down to the hooked outputs."""
    p, k, t = block.input_ids.shape
    inputs: dict[str, list[Tensor]] = {name: [] for name in modules}
    outputs: dict[str, list[Tensor]] = {name: [] for name in modules}

    def capture(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            inputs[name].append(args[0].detach())
            outputs[name].append(output)

        return hook

    handles = [m.register_forward_hook(capture(n)) for n, m in modules.items()]
    try:
        logits = _logits(model(block.input_ids.reshape(p * k, t)))
    finally:
        for handle in handles:
            handle.remove()
    hooked = [y for name in modules for y in outputs[name]]
    out_grads = iter(torch.autograd.grad(_batch_loss(logits, block, config), hooked))
    return {name: [(x, next(out_grads)) for x in inputs[name]] for name in modules}


# A rule turns one call's (input, output gradient) of (p*K, T, ...) rows into per-prompt
# gradients (p, *shape) of the module's own parameters, keyed by attribute name.
_Rule = Callable[[nn.Module, Tensor, Tensor, int], dict[str, Tensor]]


def _linear_rule(module: nn.Module, x: Tensor, g: Tensor, p: int) -> dict[str, Tensor]:
    """y = x W^T + b: dW = sum over the prompt's tokens of g x^T, db = sum of g."""
    x = x.reshape(p, -1, x.shape[-1])
    g = g.reshape(p, -1, g.shape[-1])
    out = {"weight": torch.bmm(g.transpose(1, 2), x)}
    if module.bias is not None:
        out["bias"] = g.sum(1)
    return out


def _embedding_rule(module: nn.Module, ids: Tensor, g: Tensor, p: int) -> dict[str, Tensor]:
    """Row v of the table gets the sum of g over the prompt's tokens equal to v, except the
    padding row, which ``nn.Embedding`` never updates."""
    vocab, width = module.weight.shape
    ids = ids.reshape(p, -1)
    index = (ids + vocab * torch.arange(p, device=ids.device)[:, None]).reshape(-1)
    g = g.reshape(-1, width)
    if module.padding_idx is not None:
        keep = ids.reshape(-1) != module.padding_idx
        index, g = index[keep], g[keep]
    table = g.new_zeros(p * vocab, width).index_add_(0, index, g)
    return {"weight": table.reshape(p, vocab, width)}


def _rms_norm_rule(module: nn.Module, x: Tensor, g: Tensor, p: int) -> dict[str, Tensor]:
    """HF Llama-family RMSNorm, y = w * (x / rms(x)) computed in float32: dw = sum of g * x/rms."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
    return {"weight": (g * normed.to(x.dtype)).reshape(p, -1, x.shape[-1]).sum(1)}


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

    ``method`` (module doc): None picks "vmap" on CUDA and "loop" elsewhere: on one CPU thread
    the tiny policy's backward is GEMM-bound and bigger batches only add padding and cache misses,
    so "hooks" and "vmap" were slower than the loop at every batch size (tools/bench_influence.py).
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
        self._vocab_size = _vocab_size(model)
        if method is None:
            method = "vmap" if self._device().type == "cuda" else "loop"
        self._hooked, unsupported = self._hook_plan()
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

    def zero_mask(self, trajs: Sequence[PromptTrajectories]) -> list[bool]:
        """True for prompts whose K rewards are all equal: their gradient is exactly zero."""
        return zero_mask(trajs)

    def compute_pieces(
        self, trajs: Sequence[PromptTrajectories]
    ) -> Iterator[tuple[list[int], str, int, Tensor]]:
        """Yield (indices into trajs, parameter name, flat offset, (p, numel) float32 gradients).

        Only prompts with a non-zero gradient are computed. Prompts are batched in order of
        sequence length to limit padding, so indices are not monotone across batches.
        """
        with _eval_mode(self.model):
            for indices in _plan(trajs, self._vocab_size, self.prompts_per_batch):
                grads = self._batch_grads([trajs[i] for i in indices])
                for name in self.param_names:
                    piece = grads.pop(name).reshape(len(indices), -1).float()
                    yield indices, name, self.offsets[name], piece

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

        def loss(params: dict[str, Tensor], block: _Block) -> Tensor:
            output = functional_call(self.model, (params, frozen), (block.input_ids,))
            return _prompt_loss(_logits(output), block, self.config)

        block = _collate(trajs, self._device())
        return vmap(grad(loss), in_dims=(None, 0))(params, block)

    def _hook_grads(self, trajs: list[PromptTrajectories]) -> dict[str, Tensor]:
        """All prompts of the batch in one plain forward/backward; per-prompt sums by hooks."""
        block = _collate(trajs, self._device())
        modules = {name: module for name, (module, _) in self._hooked.items()}
        calls = _hooked_backward(self.model, modules, block, self.config)
        grads: dict[str, Tensor] = {}
        for module_name, (module, owned) in self._hooked.items():
            rule = _rule(module)
            for x, g in calls[module_name]:
                for attr, piece in rule(module, x, g, len(trajs)).items():
                    if attr in owned:
                        name = owned[attr]
                        grads[name] = grads[name] + piece if name in grads else piece
        for name, p in self._params.items():  # its module never ran: zero gradient
            if name not in grads:
                grads[name] = p.new_zeros(len(trajs), *p.shape)
        return grads

    def _loop_grads(self, trajs: list[PromptTrajectories]) -> dict[str, Tensor]:
        """Reference path: one unpadded forward/backward per prompt through the real module."""
        params = list(self._params.values())
        per_prompt = []
        for traj in trajs:
            block = _Block(*(x[0] for x in _collate([traj], self._device())))
            loss = _prompt_loss(_logits(self.model(block.input_ids)), block, self.config)
            per_prompt.append(torch.autograd.grad(loss, params))
        return {
            name: torch.stack([g[j] for g in per_prompt]) for j, name in enumerate(self.param_names)
        }


class FactorisedProjection:
    """LoGra-style projection of POPI gradients of ``nn.Linear`` weights, never forming a gradient.

    For a linear layer y = x W^T the weight gradient of a prompt is G = sum_tokens g x^T with
    g = dL/dy, so its projection with the Kronecker product of P_out (out x k_out) and P_in
    (in x k_in) is
        vec(G) @ kron(P_out, P_in) = vec(P_out^T G P_in) = sum_tokens outer(P_out^T g, P_in^T x),
    built from the layer inputs (forward hooks) and output gradients (autograd with respect to the
    hooked outputs) in k_out * k_in numbers per layer: the d-dimensional gradient never exists.
    All prompts of a batch share one ordinary forward/backward as a (p*K, T) batch: rows never
    interact, so each row's activation gradient is its own prompt's. Biases are not projected
    (LoGra's convention). P_in and P_out are Gaussian / sqrt(k) from a CPU generator seeded by
    (seed, layer name), identical on every machine. Output layout: layers in ``layer_names``
    order (``offsets``), each flattened row-major as (k_out, k_in).
    """

    def __init__(
        self,
        model: nn.Module,
        config: POPIConfig,
        k_in: int,
        k_out: int,
        seed: int = 0,
        module_filter: str | None = None,
        prompts_per_batch: int = 8,
    ) -> None:
        if k_in < 1 or k_out < 1 or prompts_per_batch < 1:
            raise ValueError(
                f"k_in, k_out and prompts_per_batch must be >= 1, got {k_in}, {k_out}, "
                f"{prompts_per_batch}"
            )
        self.model = model
        self.config = config
        self.prompts_per_batch = prompts_per_batch
        pattern = re.compile(module_filter) if module_filter is not None else None
        self._layers = {
            name: m
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (pattern is None or pattern.search(name))
        }
        if not self._layers:
            raise ValueError(
                f"module_filter {module_filter!r} matches no nn.Linear of {type(model).__name__}"
            )
        self.layer_names: list[str] = list(self._layers)
        self.projections: dict[str, tuple[Tensor, Tensor]] = {}
        for name, layer in self._layers.items():
            gen = torch.Generator().manual_seed(derive_seed("factorised", seed, name))
            p_in = torch.randn(layer.in_features, k_in, generator=gen) / k_in**0.5
            p_out = torch.randn(layer.out_features, k_out, generator=gen) / k_out**0.5
            device = layer.weight.device
            self.projections[name] = (p_in.to(device), p_out.to(device))
        self.offsets = {name: j * k_in * k_out for j, name in enumerate(self.layer_names)}
        self.dim: int = len(self.layer_names) * k_in * k_out
        self._vocab_size = _vocab_size(model)

    def project(self, trajs: Sequence[PromptTrajectories]) -> Iterator[tuple[list[int], Tensor]]:
        """Yield (indices into trajs, (p, dim) float32 projected gradients) for non-zero prompts."""
        with _eval_mode(self.model):
            for indices in _plan(trajs, self._vocab_size, self.prompts_per_batch):
                yield indices, self._project_batch([trajs[i] for i in indices])

    def _project_batch(self, trajs: list[PromptTrajectories]) -> Tensor:
        device = next(iter(self._layers.values())).weight.device
        block = _collate(trajs, device)
        p = len(trajs)
        calls = _hooked_backward(self.model, self._layers, block, self.config)
        pieces = []
        for name in self.layer_names:
            p_in, p_out = self.projections[name]
            piece = torch.zeros(p, p_out.shape[1], p_in.shape[1], device=device)
            for x, g in calls[name]:  # a layer called several times contributes once per call
                xp = x.reshape(p, -1, x.shape[-1]).float() @ p_in
                gp = g.reshape(p, -1, g.shape[-1]).float() @ p_out
                piece += torch.einsum("pna,pnb->pab", gp, xp)
            pieces.append(piece.reshape(p, -1))
        return torch.cat(pieces, dim=1)


@torch.no_grad()
def behaviour_logps(
    model: nn.Module,
    prompt_ids: Sequence[int],
    completion_ids: Sequence[Sequence[int]],
    batch_size: int | None = None,
) -> list[list[float]]:
    """Teacher-forced per-token log-probs of each completion under ``model`` (beta's log-probs).

    Right-padded batches with no attention mask: the same layout the gradient pass uses, so
    rho is exactly 1 at theta = beta up to float rounding.
    """
    if not prompt_ids:
        raise ValueError("behaviour_logps: empty prompt_ids")
    for i, completion in enumerate(completion_ids):
        if not completion:
            raise ValueError(f"behaviour_logps: completion_ids[{i}] is empty")
    step = batch_size or max(len(completion_ids), 1)
    out: list[list[float]] = []
    with _eval_mode(model):
        device = next(model.parameters()).device
        for start in range(0, len(completion_ids), step):
            chunk = completion_ids[start : start + step]
            length = len(prompt_ids) + max(map(len, chunk))
            ids, target = _layout(prompt_ids, chunk, length)
            logp = _token_logps(_logits(model(ids.to(device))), ids.to(device)).cpu()
            out.extend(logp[i][target[i]].tolist() for i in range(len(chunk)))
    return out
