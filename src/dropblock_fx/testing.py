"""Check the guarantees of surgery on your own model: [`check_surgery`][dropblock_fx.testing.check_surgery].

The same check runs on every CNN of timm and torchvision (the coverage run) and in this
library's tests. On one model and one input it applies DropBlock and checks that

* the model keeps its class, and every DropBlock module is a plan row, in a stage the recipe
  selected (``DropBlock3d`` on 5-D feature maps);
* planning and applying leave no trace: every module's own state is as before (bar the
  inserted children and the plan);
* eval outputs are bit-identical to the unmodified model's;
* ``state_dict`` keys (in order) and values are unchanged, and the old weights load strictly;
* a train forward + backward runs, with finite outputs and gradients;
* every row's DropBlock module runs in that forward; when ``x`` has the planned size, on a
  feature map of its row (``x``'s batch, the row's resolution);
* at rate 0 a training forward + backward, and an eval forward, ask for no more fresh memory
  than the unmodified model's (`fresh_memory`): the rewritten forwards do what the original
  ones did, in place where those wrote in place;
* ``remove_dropblock`` restores the module tree, the classes and the eval outputs.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from .graph.shapes import fresh, input_shape_of
from .graph.splice import original_class
from .modes import training_mode
from .modules import DropBlock3d, DropBlockNd, is_inserted
from .recipe import resolve_stages
from .surgery import Plan, apply_dropblock, plan_of, remove_dropblock
from .surgery import plan as plan_model
from .surgery.target import as_inputs

__all__ = ["CheckFailed", "FreshMemory", "check_surgery", "fresh_memory", "module_state", "output_tensors",
           "zoo_model"]


class CheckFailed(AssertionError):
    """A guarantee does not hold; ``step`` names the check."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"[{step}] {message}")
        self.step = step


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model output (tensors, dicts, lists, tuples, namedtuples)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in out for t in output_tensors(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in output_tensors(o)]
    return []


def _same(a: Any, b: Any) -> bool:
    ta, tb = output_tensors(a), output_tensors(b)
    return len(ta) == len(tb) > 0 and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb))


class FreshMemory(NamedTuple):
    """What `fresh_memory` counted: bytes of new storage, in how many tensors."""

    bytes: int
    tensors: int


def fresh_memory(fn: Callable[[], Any]) -> FreshMemory:
    """The fresh memory ``fn()`` asks for: the bytes of every new storage that an operator it
    runs returns (forward and, when ``fn`` calls it, backward), counted under a
    ``TorchDispatchMode``. A tensor written in place, a view, or an empty tensor (0 bytes, no
    allocation) adds nothing. The count does
    not depend on timing or on the allocator: on the CPU, with glibc's defaults, each MiB of
    it that a training step asks for is 256 page faults, step after step.

    Examples:
        >>> x = torch.ones(256, 1024)  # 1 MiB of fp32
        >>> fresh_memory(lambda: x * 2)
        FreshMemory(bytes=1048576, tensors=1)
        >>> fresh_memory(lambda: x.mul_(2).view(-1))
        FreshMemory(bytes=0, tensors=0)
        >>> fresh_memory(lambda: x[:0] * 2)  # an empty result allocates nothing
        FreshMemory(bytes=0, tensors=0)
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def storage(t: torch.Tensor) -> Optional[Any]:
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested: no plain storage
            return None
        return s.data_ptr(), s.nbytes()

    count = [0, 0]

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
            given = {storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                s = storage(t) if isinstance(t, torch.Tensor) else None
                if s is not None and s[1] > 0 and s not in given:
                    given.add(s)
                    count[0] += s[1]
                    count[1] += 1
            return out

    with _Count():
        fn()
    return FreshMemory(count[0], count[1])


def module_state(model: nn.Module) -> dict:
    """Every module's own state, to compare before and after: its ``__dict__`` keys with the
    identity of each value, one level into lists and dicts, and each tensor's device (a meta
    tensor or a proxy left in a cache shows here).

    Examples:
        >>> m = nn.Sequential(nn.Conv2d(3, 4, 3))
        >>> before = module_state(m)
        >>> m[0].cache = 1
        >>> module_state(m) == before
        False
    """
    out = {}
    for name, m in model.named_modules():
        for k, v in m.__dict__.items():
            inner: object = None
            if isinstance(v, list):
                inner = tuple((id(x), getattr(x, "device", None)) for x in v)
            elif isinstance(v, dict):
                inner = tuple((key, id(x), getattr(x, "device", None)) for key, x in v.items())
            out[(name, k)] = (id(v), getattr(v, "device", None), inner)
    return out


def _without_surgery(state: dict, inserted: set[str]) -> dict:
    """``state`` without what surgery adds on purpose: children, the plan, its own modules
    (and whatever a timm slot held before it)."""
    return {k: v for k, v in state.items() if k[1] not in ("_modules", "dropblock_plan") and k[0] not in inserted}


# apply_dropblock's own keywords (replace, keep_foreign, verify), which plan() does not take.
_APPLY_ONLY = (frozenset(inspect.signature(apply_dropblock).parameters)
               - frozenset(inspect.signature(plan_model).parameters))


def check_surgery(model: nn.Module, x: Any, recipe: Any = None, *, runner: Optional[nn.Module] = None,
                  require_sites: bool = True, **overrides: Any) -> Plan:
    """Apply DropBlock to ``model`` (in place), check every guarantee on input ``x``, then
    remove it again; returns the plan. Raises [`CheckFailed`][dropblock_fx.testing.CheckFailed] naming the check.

    The eval checks run in eval mode and the train check in train mode, whatever mode the
    model comes in (a timm or torchvision factory returns it in train mode); each module's
    mode is restored at the end. Pass or fail, the model is left as it came: a failed check
    removes the DropBlock modules and puts the weights back before it raises.

    Args:
        model: the model.
        x: an input batch (batch size 2 or more, for batch norm in train mode): a tensor,
            or what ``example_inputs=`` takes (a tuple of positional arguments, or
            ``(args, kwargs)``) for a model that does not take one image.
        recipe: as for [`apply_dropblock`][dropblock_fx.apply_dropblock]; ``overrides`` too (``target=``,
            ``input_size=`` default to ``x``'s size).
        runner: the module to call with ``x`` (default: ``model``), e.g. a detector's
            backbone when ``target="backbone.body"``.
        require_sites: fail when nothing was inserted (step ``"sites"``, with the plan's
            notes); with False, a model the recipe finds no site in passes the checks that
            remain (its outputs and weights unchanged) and its plan, with no rows, is returned.

    Examples:
        >>> import torchvision
        >>> m = torchvision.models.resnet18().eval()
        >>> p = check_surgery(m, torch.randn(2, 3, 64, 64))
        >>> len(p.rows)
        12
    """
    runner = model if runner is None else runner
    if isinstance(x, torch.Tensor):
        overrides.setdefault("input_size", list(x.shape[1:]))
    else:
        overrides.setdefault("example_inputs", x)
    with training_mode(model, False):  # the eval checks in eval mode; every module's mode restored
        return _check(model, x, recipe, runner, require_sites, overrides)


def _check(model: nn.Module, x: Any, recipe: Any, runner: nn.Module, require_sites: bool,
           overrides: dict[str, Any]) -> Plan:
    args, kwargs = ((x,), {}) if isinstance(x, torch.Tensor) else as_inputs(x)
    x_shape = input_shape_of((args, kwargs), output_tensors(args)[0].shape[0] if output_tensors(args) else 1)

    def run() -> Any:  # fresh lists each call: a forward may write into its input list (SlowFast)
        a, k = fresh((args, kwargs))
        return runner(*a, **k)

    def train_step() -> Any:  # a forward and a backward in train mode; returns the loss
        with training_mode(model, True), warnings.catch_warnings():  # a check, not a run: no schedule
            warnings.filterwarnings("ignore", message=".*no schedule is attached")
            out = output_tensors(run())
        loss = sum(t.float().sum() for t in out if t.is_floating_point())
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
        return loss

    outs: list[Any] = []
    with torch.no_grad():
        original_eval = fresh_memory(lambda: outs.append(run()))
    ref = outs.pop()
    if not output_tensors(ref):
        raise CheckFailed("reference forward", "the model's output holds no tensor")
    cls, tree, classes = type(model), repr(model), [type(m) for m in model.modules()]
    weights = copy.deepcopy(model.state_dict())  # keeps _metadata (MNASNet's loader needs its version)

    def restore() -> None:  # after a train step: no gradients, the norms' running statistics back
        model.zero_grad(set_to_none=True)
        model.load_state_dict(weights, strict=True)

    try:
        with torch.random.fork_rng(devices=[]):  # the same random numbers in both counted steps
            torch.manual_seed(0)
            original_memory = fresh_memory(train_step)
    except Exception as e:  # noqa: BLE001 - the unmodified model cannot train on x
        raise CheckFailed("reference train step", f"{type(e).__name__}: {' '.join(str(e).split())}") from e
    finally:
        restore()
    state = module_state(model)

    step = "apply_dropblock"
    try:
        apply_dropblock(model, recipe, **overrides)
        applied = plan_of(model)
        # Nothing inserted: apply_dropblock keeps no plan (and warns); the plan says why.
        plan = applied if applied is not None else plan_model(
            model, recipe, **{k: v for k, v in overrides.items() if k not in _APPLY_ONLY})
        mods = {n: m for n, m in model.named_modules() if isinstance(m, DropBlockNd)}

        step = "sites"
        if original_class(model) is not cls or type(model).__name__ != cls.__name__:
            raise AssertionError("the model's class changed")
        if require_sites and not mods:
            raise AssertionError(f"no DropBlock site (stages {[s.index for s in plan.stages]}; "
                                 f"notes: {'; '.join(plan.notes)[:150]})")
        if sorted(r.path for r in plan.rows) != sorted(mods):  # rows name the modules by their model path
            raise AssertionError(f"{len(mods)} DropBlock modules but {len(plan.rows)} plan rows, or other paths")
        selected = {i for i, _ in resolve_stages(plan.recipe, plan.stages, skipped=[])}
        bad = sorted({m.placement.stage for m in mods.values()} - selected)
        if bad:
            raise AssertionError(f"sites in stages {bad}, the recipe selected {sorted(selected)}")
        if any((len(r.resolution) == 3) != isinstance(mods[r.path], DropBlock3d) for r in plan.rows):
            raise AssertionError("a DropBlock's dimension does not match its feature map")

        step = "no trace"
        inserted = {n for n, m in model.named_modules() if is_inserted(m)}
        if _without_surgery(module_state(model), inserted) != _without_surgery(state, inserted):
            raise AssertionError("planning or applying changed the model's own state")

        step = "eval identity"
        with torch.no_grad():
            applied_eval = fresh_memory(lambda: outs.append(run()))
            if not _same(outs.pop(), ref):
                raise AssertionError("eval outputs differ after apply_dropblock")

        step = "state_dict identity"
        after = model.state_dict()
        if list(after) != list(weights):
            raise AssertionError("state_dict keys differ")
        diff = [k for k in weights if not torch.equal(after[k], weights[k])]
        if diff:
            raise AssertionError(f"state_dict values differ: {diff[:3]}")
        model.load_state_dict(weights, strict=True)

        step = "train forward/backward"
        for m in mods.values():
            m.drop_prob = max(float(m.target_drop_prob), 0.1)
        seen: dict[str, list[tuple[int, ...]]] = {}
        hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.setdefault(n, []).append(tuple(args[0].shape)))
                 for n, m in mods.items()]
        try:
            loss = train_step()
        finally:
            for h in hooks:
                h.remove()
        if not torch.isfinite(loss):
            raise AssertionError("train output not finite")
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            raise AssertionError("no gradient reached the parameters")
        if not all(torch.isfinite(g).all() for g in grads):
            raise AssertionError("non-finite gradients")
        restore()

        step = "rows run"
        _check_rows_ran(plan, seen, tuple(x_shape or ()), plan_size=tuple(plan.input_shape[1:]))

        step = "memory"
        for m in mods.values():
            m.drop_prob = 0.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            applied_memory = fresh_memory(train_step)
        restore()
        for what, after_, before_ in (("a training step at rate 0", applied_memory, original_memory),
                                      ("an eval forward", applied_eval, original_eval)):
            if after_.bytes > before_.bytes:
                raise AssertionError(
                    f"{what} asks for {after_.bytes - before_.bytes} bytes more fresh memory than the "
                    f"unmodified model's ({after_.tensors} new tensors, {before_.tensors} before)")

        step = "remove_dropblock"
        remove_dropblock(model)
        if repr(model) != tree or [type(m) for m in model.modules()] != classes:
            raise AssertionError("remove_dropblock did not restore the module tree")
        if any(isinstance(m, DropBlockNd) for m in model.modules()) or plan_of(model) is not None:
            raise AssertionError("DropBlock left after remove_dropblock")
        with torch.no_grad():
            if not _same(run(), ref):
                raise AssertionError("eval outputs differ after remove_dropblock")
    except Exception as e:  # noqa: BLE001 - every failure names its check
        remove_dropblock(model)  # a failed check leaves the model as it came
        restore()
        if isinstance(e, CheckFailed):
            raise
        raise CheckFailed(step, f"{type(e).__name__}: {' '.join(str(e).split())}") from e
    return plan


def _check_rows_ran(plan: Plan, seen: dict[str, list[tuple[int, ...]]], x_shape: tuple[int, ...],
                    plan_size: tuple[int, ...]) -> None:
    """Every row ran; at the planned input size, on its own feature map (a module called at
    several sizes, a head shared by an FPN's levels, on stage maps)."""
    missing = [r.path for r in plan.rows if r.path not in seen]
    if missing:
        raise AssertionError(f"{len(missing)} of {len(plan.rows)} DropBlock modules never ran in a training "
                             f"forward: {', '.join(missing[:3])}")
    if tuple(x_shape[1:]) != plan_size:
        return
    maps = {tuple(s.resolution) for s in plan.stages}
    for r in plan.rows:
        shapes = set(seen[r.path])
        for s in shapes:
            ok = s[0] == x_shape[0] and (tuple(s[2:]) == tuple(r.resolution)
                                         or (len(shapes) > 1 and tuple(s[2:]) in maps))
            if not ok:
                raise AssertionError(f"{r.path} ran on a {'x'.join(map(str, s))} tensor; its row says a "
                                     f"{'x'.join(map(str, r.resolution))} map of stage {r.stage} at batch {x_shape[0]}")


def zoo_model(source: str, name: str) -> tuple[nn.Module, str, nn.Module, list[tuple[int, ...]]]:
    """A timm or torchvision model built as the coverage run builds it (random init):
    ``(model, target, runner, input sizes to try, smallest first)``.

    ``source`` is ``"timm"`` or ``"tv-classification"``, ``"tv-segmentation"``,
    ``"tv-video"``, ``"tv-detection"`` (whose target is the one ``apply_dropblock`` picks:
    ``backbone.body``, ``backbone.features`` for SSD).
    """
    if source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        return model, "", model, _image_sizes(model, name)
    import torchvision.models as tvm

    kind = source[3:]
    kw: dict[str, Any] = {"weights": None}
    if kind in ("segmentation", "detection"):
        kw["weights_backbone"] = None
    if name in ("googlenet", "inception_v3"):
        kw["aux_logits"] = False
        if kind == "classification":
            kw["init_weights"] = True
    model = tvm.get_model(name, **kw)
    if kind == "detection":
        from .surgery.target import backbone_target

        target = backbone_target(model)  # what apply_dropblock picks for a detector without target
        return model, target, model.get_submodule(target), _image_sizes(model, name)
    if kind == "video":  # S3D pools over (2, 7, 7) at stride (8, 32, 32), so needs 16x224x224
        return model, "", model, [(3, 8, 64, 64), (3, 16, 224, 224)]
    return model, "", model, _image_sizes(model, name)


def _image_sizes(model: nn.Module, name: str) -> list[tuple[int, ...]]:
    sizes = [(3, 64, 64)]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("min_input_size"):
        m = tuple(cfg["min_input_size"])
        sizes = [(m[0], max(64, m[1]), max(64, m[2]))]
    if name == "inception_v3":
        sizes = [(3, 80, 80)]
    sizes += [(sizes[0][0], s, s) for s in (96, 128, 160, 224, 300, 320)]
    if cfg.get("input_size"):
        sizes.append(tuple(cfg["input_size"]))
    return list(dict.fromkeys(sizes))
