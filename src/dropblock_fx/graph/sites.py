"""Site matchers on the FX graph of one unit (a block, or a container's loose layers).

Site kinds (positions in the unit's graph):

* ``conv``: after ``conv -> norm``, after the activation where one follows (the official
  code: after BN+ReLU); in norm-free models after ``conv -> act``, or after the conv when
  nothing follows it (an FPN's convs). Chains on a residual
  shortcut or ending a residual branch are not ``conv`` sites (see below).
* ``conv_last``: after the last ``conv -> norm (-> act)`` chain of a residual branch,
  before the add (on the branch's edge into the add when that chain's output is not the
  add's layout, e.g. ConvNeXt's channels-last norm).
* ``shortcut``: on the shortcut edge into a residual add: after the projection conv+norm,
  or on the identity itself.
* ``block``: on the unit's output.

A residual add is a two-input add of equal-shape feature maps; its shortcut is the input
whose own ancestors (those not shared with the other input) hold fewer convs.

Every site is on a feature map, by the rule of ``graph.feature_maps``: the input's batch, a
stage map's spatial size, on the unit's main path (never a gate's branch or attention
logits). A feature map may also be channels-last, ``N, (D,) H, W, C`` (MambaOut's stages,
ConvNeXt's MLPs): a site on one of those is wrapped in two permutes (a view on each side, so
the DropBlock sees an ``N, C, H, W`` view with channels_last strides). ``Site.shape`` is
always the channels-first shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .feature_maps import FeatureMaps, side_nodes
from .leaves import ADD_FUNCTIONS, ADD_METHODS, is_act_node, is_conv, is_identity, is_norm, is_norm_act

__all__ = ["Site", "commute_with_relu", "feeds_relu_alone", "find_sites", "insert_sites", "owns_norm_output",
           "writable_norm"]


@dataclass
class Site:
    kind: str
    name: str  # child name of the DropBlock module in the unit
    anchor: str  # human-readable position
    shape: tuple[int, ...]
    after: Optional[str] = None  # node name: insert after it (all users rerouted)
    edge: Optional[tuple[str, str]] = None  # (src node, dst node): insert on this edge only
    channels_last: bool = False  # the tensor is N, (D,) H, W, C: permuted around the DropBlock


def _shape(v: Any) -> Optional[tuple[int, ...]]:
    if isinstance(v, torch.Tensor) and v.dim() in (4, 5):
        return tuple(int(s) for s in v.shape)
    return None


def _mod(node: fx.Node, unit: nn.Module) -> Optional[nn.Module]:
    return unit.get_submodule(str(node.target)) if node.op == "call_module" else None


def _single_user(node: fx.Node, unit: nn.Module) -> Optional[fx.Node]:
    """The only user of ``node``, skipping identity modules."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if is_identity(_mod(user, unit)):
            node = user
            continue
        return user
    return None


def _chain_end(conv: fx.Node, unit: nn.Module, norm_free: bool) -> Optional[fx.Node]:
    nxt = _single_user(conv, unit)
    if nxt is None:
        return conv if norm_free else None
    m = _mod(nxt, unit)
    if m is not None and is_norm(m):
        if is_norm_act(m):
            return nxt
        act = _single_user(nxt, unit)
        return act if act is not None and is_act_node(act, unit) else nxt
    if is_act_node(nxt, unit):  # conv -> act -> norm (post-activation norm: ConvMixer)
        after = _single_user(nxt, unit)
        am = _mod(after, unit) if after is not None else None
        if am is not None and is_norm(am):
            return after
    if norm_free:  # after the activation, or after the conv itself when none follows (an FPN)
        return nxt if is_act_node(nxt, unit) else conv
    return None


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in ADD_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in ADD_METHODS


def _ancestors(node: fx.Node, memo: dict[fx.Node, frozenset]) -> frozenset:
    if node in memo:
        return memo[node]
    stack, seen = [node], {node}
    while stack:
        n = stack.pop()
        for i in n.all_input_nodes:
            if i not in seen:
                seen.add(i)
                stack.append(i)
    memo[node] = frozenset(seen)
    return memo[node]


def _scope(node: fx.Node) -> str:
    """The innermost submodule whose forward produced ``node`` ('' for the unit itself)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else k for k, v in stack.items()]
    return paths[-1] if paths else ""


def _label(prefix: str, scope: str) -> str:
    return f"dropblock_{scope.replace('.', '_')}_{prefix}" if scope else f"dropblock_{prefix}"


def find_sites(graph: fx.Graph, unit: nn.Module, values: dict[fx.Node, Any], kinds: set[str],
               norm_free: bool, is_block: bool, maps: FeatureMaps,
               rejected: Optional[list[tuple[str, str]]] = None) -> list[Site]:
    """Candidate sites of ``kinds`` in ``graph`` (positions by node name). ``maps``: the
    network's stage maps and the batch of the recorded call; ``rejected`` receives
    ``(position, why)`` for positions left out because they hold no feature map."""
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    convs = [n for n in nodes if n.op == "call_module" and is_conv(_mod(n, unit))]
    spatial = maps.spatial
    side = side_nodes(graph, unit, values)

    def last(node: fx.Node) -> bool:
        """Is ``node`` a channels-last (N, (D,) H, W, C) view of a stage map?"""
        s = _shape(values.get(node))
        return s is not None and s[-2:] not in spatial and s[-3:-1] in spatial

    def ok(node: fx.Node, what: str = "") -> Optional[tuple[int, ...]]:
        """The channels-first shape of a feature map (else None; says why in ``rejected``)."""
        s = _shape(values.get(node))
        if s is None:
            return None
        if last(node):
            s = (s[0], s[-1], *s[1:-1])
        why = "it is on a side branch (only a gate depends on it)" if node in side else maps.why_not(s)
        if why is not None:
            if rejected is not None and what:
                rejected.append((f"{what}, {'x'.join(map(str, s))}", why))
            return None
        return s

    chains = {c: e for c in convs if (e := _chain_end(c, unit, norm_free)) is not None}
    conv_holders: dict[fx.Node, bool] = {}

    def holds_conv(n: fx.Node) -> bool:
        """A call of a conv, or of a child unit with convs inside (a descended block's branch)."""
        if n not in conv_holders:
            m = _mod(n, unit)
            conv_holders[n] = m is not None and any(is_conv(x) for x in m.modules())
        return conv_holders[n]
    ends = {e: c for c, e in chains.items()}
    sites: list[Site] = []
    taken: set[Any] = set()
    used_ends: set[fx.Node] = set()
    memo: dict[fx.Node, frozenset] = {}
    counts: dict[str, int] = {}

    def name_for(prefix: str, scope: str) -> str:
        base = _label(prefix, scope)
        counts[base] = counts.get(base, 0) + 1
        return base if counts[base] == 1 else f"{base}_{counts[base]}"

    def add(site: Site, key: Any) -> None:
        if key in taken:
            return
        taken.add(key)
        sites.append(site)

    for r in nodes:
        if not _is_add(r):
            continue
        ins = [a for a in r.args[:2] if isinstance(a, fx.Node)]
        if len(ins) != 2 or _shape(values.get(ins[0])) != _shape(values.get(ins[1])) or (s_r := ok(r, f"{r.name} (residual add)")) is None:
            continue
        a0, a1 = _ancestors(ins[0], memo), _ancestors(ins[1], memo)
        own0, own1 = a0 - a1, a1 - a0
        c0 = sum(1 for n in own0 if n in chains or holds_conv(n))
        c1 = sum(1 for n in own1 if n in chains or holds_conv(n))
        if c0 == c1:
            continue
        (short, s_own), (branch, b_own) = ((ins[0], own0), (ins[1], own1)) if c0 < c1 else ((ins[1], own1), (ins[0], own0))
        used_ends.update(e for e in ends if e in s_own)
        scope = _scope(r)
        if "shortcut" in kinds:
            add(Site("shortcut", name_for("shortcut", scope), f"shortcut into {r.name}" + _nhwc(last(r)), s_r,
                     edge=(short.name, r.name), channels_last=last(r)), ("edge", short.name, r.name))
        on_branch = [e for e in ends if e in b_own]
        # a norm on the branch, or a child unit with convs (a descended block's branch)
        has_norm = any(n.op == "call_module" and (is_norm(_mod(n, unit)) or (holds_conv(n) and not is_conv(_mod(n, unit))))
                       for n in b_own)
        if on_branch:
            end_ = max(on_branch, key=order.__getitem__)
            used_ends.add(end_)
            if "conv_last" in kinds:
                if ok(end_) == s_r and last(end_) == last(r):
                    add(Site("conv_last", name_for("conv_last", scope), f"after {_text(end_)} (end of branch)"
                             + _nhwc(last(r)), s_r, after=end_.name, channels_last=last(r)), ("after", end_.name))
                else:
                    add(Site("conv_last", name_for("conv_last", scope), f"branch into {r.name}" + _nhwc(last(r)),
                             s_r, edge=(branch.name, r.name), channels_last=last(r)), ("edge", branch.name, r.name))
        elif (has_norm or norm_free) and "conv_last" in kinds:
            add(Site("conv_last", name_for("conv_last", scope), f"branch into {r.name}" + _nhwc(last(r)), s_r,
                     edge=(branch.name, r.name), channels_last=last(r)), ("edge", branch.name, r.name))

    if "conv" in kinds:
        for conv, end in chains.items():
            if end in used_ends:
                continue
            s = ok(end, f"after {_text(conv)}")
            if s is None:
                continue
            add(Site("conv", name_for(str(conv.target).replace(".", "_"), ""),
                     (f"after {_text(conv)} > {_text(end)}" if end is not conv else f"after {_text(conv)}")
                     + _nhwc(last(end)), s, after=end.name, channels_last=last(end)), ("after", end.name))

    if "block" in kinds and is_block:
        out = next(n for n in nodes if n.op == "output")
        val = out.args[0]
        if isinstance(val, fx.Node) and (s := ok(val)) is not None:
            add(Site("block", "dropblock_block", "block output" + _nhwc(last(val)), s, edge=(val.name, out.name),
                     channels_last=last(val)), ("edge", val.name, out.name))
    sites.sort(key=lambda s: order[_node(graph, s.after or s.edge[1])])  # type: ignore[index]
    return sites


def _nhwc(channels_last: bool) -> str:
    return " [channels-last]" if channels_last else ""


def _text(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _node(graph: fx.Graph, name: str) -> fx.Node:
    for n in graph.nodes:
        if n.name == name:
            return n
    raise KeyError(name)


def insert_sites(graph: fx.Graph, sites: list[Site]) -> None:
    """Insert one ``call_module`` per site (target: the site's name) into ``graph``; a
    channels-last site gets ``permute`` views before and after it."""
    by_name = {n.name: n for n in graph.nodes}

    def dropblock(src: fx.Node, site: Site) -> tuple[fx.Node, fx.Node]:
        """(first new node, output node), inserted at the current insert point, in order."""
        if not site.channels_last:
            new = graph.call_module(site.name, (src,))
            return new, new
        nd = len(site.shape)
        first = graph.call_method("permute", (src, 0, nd - 1, *range(1, nd - 1)))
        mid = graph.call_module(site.name, (first,))
        return first, graph.call_method("permute", (mid, 0, *range(2, nd), 1))

    for site in sites:
        if site.after is not None:
            node = by_name.get(site.after)
            if node is None:
                continue
            with graph.inserting_before(node.next):  # keeps the new nodes in order
                first, new = dropblock(node, site)
            node.replace_all_uses_with(new, delete_user_cb=lambda u, first=first: u is not first)
        else:
            src, dst = by_name.get(site.edge[0]), by_name.get(site.edge[1])  # type: ignore[index]
            if src is None or dst is None:
                continue
            with graph.inserting_before(dst):
                _, new = dropblock(src, site)
            dst.replace_input_with(src, new)
    graph.lint()


# Norms whose backward reads their input and statistics, never their output: a DropBlock that
# is the only reader of their output may write into it (modules.writable_norm_output checks
# the autograd node at run time as well).
_WRITABLE_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_WRITABLE_NORM_FUNCTIONS = (F.batch_norm, torch.batch_norm, F.group_norm, torch.group_norm)
_NORM_FORWARDS = (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward, nn.GroupNorm.forward)


def writable_norm(m: Any) -> bool:
    """Is ``m`` a batch or group norm module whose output is the norm's own, with no forward
    hooks (a hook could keep its output)? Its forward is torch's, or it is one of timm's norm +
    activation layers with no activation and no dropout (``BatchNormAct2d(apply_act=False)``).

    Examples:
        >>> writable_norm(nn.BatchNorm2d(8)), writable_norm(nn.LayerNorm(8))
        (True, False)
    """
    if not isinstance(m, _WRITABLE_NORMS) or m._forward_hooks or m._forward_pre_hooks:
        return False
    if type(m).forward in _NORM_FORWARDS:
        return True
    return type(m).__module__.startswith("timm.layers.norm_act") and all(
        type(c) is nn.Identity for c in m.children())


def _call_of(graph: fx.Graph, name: str) -> Optional[fx.Node]:
    """The call of the unit's child module ``name`` in ``graph`` (``None``: not called there)."""
    return next((n for n in graph.nodes if n.op == "call_module" and n.target == name), None)


def owns_norm_output(graphs: Iterable[fx.Graph], name: str, unit: nn.Module) -> bool:
    """Is the DropBlock call ``name`` the only reader of a norm's output in every one of a unit's
    ``graphs`` that has it (and is there one)?

    The norm is a batch or group norm module without forward hooks (`writable_norm`) or the
    functional form; the DropBlock reads it directly (not through a permuted view) and no other
    node reads it.

    Examples:
        >>> unit = nn.Module()
        >>> unit.bn = nn.BatchNorm2d(8)
        >>> g = fx.Graph()
        >>> bn = g.call_module("bn", (g.placeholder("x"),))
        >>> out = g.output(g.call_module("dropblock", (bn,)))
        >>> owns_norm_output([g], "dropblock", unit), owns_norm_output([g], "other", unit)
        (True, False)
    """
    seen = False
    for graph in graphs:
        node = _call_of(graph, name)
        if node is None:
            continue
        seen = True
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return False
        if not _owned_norm_output(node.args[0], unit):
            return False
    return seen


def _owned_norm_output(node: fx.Node, unit: nn.Module) -> bool:
    """``node`` is a writable norm's output (`writable_norm`, or the functional form) read by one node."""
    if len(node.users) != 1:
        return False
    if node.op == "call_module":
        return writable_norm(unit.get_submodule(str(node.target)))
    return node.op == "call_function" and node.target in _WRITABLE_NORM_FUNCTIONS


# Activations that commute with a DropBlock without noise: f(0) = 0 and f(a s) = s f(a) for s > 0
# (ReLU; leaky ReLU with a slope >= 0). Dropping then activating gives the same values, and the
# same gradients: the activation's backward masks by its output's sign, which zero only adds to
# where the DropBlock's backward zeroes the gradient anyway.
_RELU_MODULES = (nn.ReLU, nn.LeakyReLU)
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_, F.relu_, F.leaky_relu, F.leaky_relu_)
_RELU_METHODS = ("relu", "relu_")


def _commuting_relu(node: fx.Node, unit: nn.Module) -> bool:
    """A ReLU or leaky ReLU (slope >= 0) call whose only tensor input is its first argument."""
    if any(isinstance(a, fx.Node) for a in node.args[1:]) or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        return False
    if node.op == "call_module":
        m = unit.get_submodule(str(node.target))
        if type(m) not in _RELU_MODULES or m._forward_hooks or m._forward_pre_hooks:
            return False
        return getattr(m, "negative_slope", 0.0) >= 0
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        if node.target in (F.leaky_relu, F.leaky_relu_):
            slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
            return isinstance(slope, (int, float)) and slope >= 0
        return True
    return node.op == "call_method" and node.target in _RELU_METHODS


def _zeroing_relu(node: fx.Node, unit: nn.Module) -> bool:
    """A `_commuting_relu` whose output is zero exactly where its input is <= 0 (slope 0): its
    backward zeroes the gradient there."""
    if not _commuting_relu(node, unit):
        return False
    if node.op == "call_module":
        return getattr(unit.get_submodule(str(node.target)), "negative_slope", 0.0) == 0
    if node.op == "call_function" and node.target in (F.leaky_relu, F.leaky_relu_):
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
        return slope == 0
    return True


def feeds_relu_alone(graphs: Iterable[fx.Graph], name: str, unit: nn.Module) -> bool:
    """Does the DropBlock call ``name`` feed one ReLU alone (through identity modules without
    hooks), as that ReLU's input, in every one of a unit's ``graphs`` that has it (and is there
    one)?

    Then the gradient that reaches the DropBlock's output is already zero at every unit it
    dropped (a dropped unit is 0, and the ReLU's backward zeroes the gradient where its output
    is 0): its backward need not apply its mask again. A leaky ReLU with a slope other than 0
    does not zero it, nor does any other activation.

    Examples:
        >>> unit = nn.Module()
        >>> unit.bn, unit.act = nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        >>> g = fx.Graph()
        >>> db = g.call_module("dropblock", (g.call_module("bn", (g.placeholder("x"),)),))
        >>> out = g.output(g.call_module("act", (db,)))
        >>> feeds_relu_alone([g], "dropblock", unit), feeds_relu_alone([g], "other", unit)
        (True, False)
        >>> unit.act = nn.LeakyReLU(0.1)
        >>> feeds_relu_alone([g], "dropblock", unit)
        False
    """
    seen = False
    for graph in graphs:
        node = _call_of(graph, name)
        if node is None:
            continue
        seen = True
        while len(node.users) == 1:
            user = next(iter(node.users))
            if not user.args or user.args[0] is not node or node in user.args[1:] or node in user.kwargs.values():
                return False
            m = _mod(user, unit)
            if m is None or not is_identity(m) or m._forward_hooks or m._forward_pre_hooks or len(user.args) != 1:
                break
            node = user  # an identity module (an empty timm drop_block slot) between them
        else:
            return False  # read by several nodes, or by none
        if not _zeroing_relu(user, unit):
            return False
    return seen


def commute_with_relu(graph: fx.Graph, name: str, unit: nn.Module) -> bool:
    """Move the DropBlock call ``name`` from after a ReLU to before it, onto a norm's output.

    Only where that lets the DropBlock write into the norm's output (`owns_norm_output`): the
    call reads the ReLU alone, the ReLU reads a batch or group norm's output alone (through
    identity modules, such as timm's ``drop_block`` slot when it is empty), the norm is
    `writable_norm` or the functional form, and nothing else reads any of them. ``norm -> relu
    -> dropblock`` becomes ``norm -> dropblock -> relu``: for a DropBlock without noise the same
    values and gradients, without a new map for the DropBlock's output. Returns whether it
    moved.

    Examples:
        >>> unit = nn.Module()
        >>> unit.bn, unit.act = nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        >>> g = fx.Graph()
        >>> act = g.call_module("act", (g.call_module("bn", (g.placeholder("x"),)),))
        >>> out = g.output(g.call_module("dropblock", (act,)))
        >>> commute_with_relu(g, "dropblock", unit), [n.target for n in g.nodes][1:]
        (True, ['bn', 'dropblock', 'act', 'output'])
    """
    db = _call_of(graph, name)
    if db is None or len(db.args) != 1 or db.kwargs or not isinstance(db.args[0], fx.Node):
        return False
    act = db.args[0]
    if len(act.users) != 1 or not act.args or not isinstance(act.args[0], fx.Node):
        return False
    if not _commuting_relu(act, unit):
        return False
    reader, norm = act, act.args[0]  # identity modules between the norm and the ReLU are skipped
    while (norm.op == "call_module" and is_identity(unit.get_submodule(str(norm.target))) and len(norm.users) == 1
           and len(norm.args) == 1 and not norm.kwargs and isinstance(norm.args[0], fx.Node)):
        reader, norm = norm, norm.args[0]
    if not _owned_norm_output(norm, unit):
        return False
    norm.append(db)  # the DropBlock call now runs just after the norm
    db.replace_all_uses_with(act)
    db.args = (norm,)
    reader.replace_input_with(norm, db)
    graph.lint()
    return True
