"""What a tuner keeps between steps so that a step does little per-parameter Python work: a :class:`Workspace`.

A step reads and writes the same per-parameter buffers every time (``w0``, ``u``, the base's state tensors it
snapshots, a scratch vector). Looking them up in ``state`` (a dict keyed by tensors, with dicts inside),
checking that each fits its parameter and launching one copy per parameter cost a small model about as much
as the base's own step. The workspace holds them for one set of stepped parameters:

* **Flat buffers.** When the parameters allow concatenated dot products (one dtype and device, few entries:
  :func:`torch_backend.vectors.can_concatenate`), ``w0``, ``u`` (two with the secant oracle, which keeps the
  previous direction) and a scratch vector are each one contiguous tensor with a view per parameter, so
  ``u <- w - w0``, the dot products, the norms (:meth:`Workspace.norms`) and ``w0 + a u`` are single
  operations on them. These views are what ``state[p]["curvopt_w0"]`` / ``["curvopt_u"]`` hold. Otherwise
  they are one tensor per parameter, as before, and the same code runs over the lists.
* **Cached state.** The state entries of the stepped parameters, the base's tensors in them (what the
  rollback snapshot copies) and the flattened views those tensors are copied through. In flat mode the
  snapshot's storage for the tensors of the parameters' dtype and device follows ``w0`` in one allocation,
  so ``w0 <- w`` and the snapshot are one concatenation (:meth:`Workspace.take_start`).

:meth:`Workspace.matches` checks, each step, that the same parameters have gradients and that their state
entries are the same dicts, of the same sizes, holding the same base tensors; anything else (a new parameter
group, a parameter that gained or lost its gradient, the base's lazy initialisation, a loaded state dict, a
rollback) rebuilds the workspace (:func:`build`), keeping the buffers whose values matter (``u``, the secant's
memory) by copying them.
"""
from __future__ import annotations

import operator
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from curvopt.rules import moved_entries

from . import state as layout
from .transaction import fits
from .vectors import flat_norms
from .vectors import norms as vector_norms

__all__ = ["Workspace", "build", "split_flat"]

_is = operator.is_


def split_flat(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of the 1-d ``flat`` shaped like ``like`` (consecutive, in order)."""
    out, o = [], 0
    for p in like:
        n = p.numel()
        out.append(flat[o:o + n].view(p.shape))
        o += n
    return out


class _Buffer:
    """One parameter-shaped vector: per-parameter tensors, and the flat tensor they are views of (or None)."""

    __slots__ = ("flat", "views")

    def __init__(self, params: Sequence[Tensor], flat: Union[bool, Tensor]) -> None:
        if flat is not False:  # True: allocate; a tensor: the storage to use
            self.flat: Optional[Tensor] = flat if isinstance(flat, Tensor) else torch.empty(
                sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
            self.views = split_flat(self.flat, params)
        else:
            self.flat = None
            self.views = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]


def _kinds(params: Sequence[Tensor]) -> list[tuple]:
    return [(p.dtype, p.device) for p in params]


class Workspace:
    """See the module docstring. Built by :func:`build`; ``params`` are the parameters with a gradient and
    entries (the step's vectors), ``stepped`` those with a gradient (zero-size ones included: the base steps
    them), ``index`` the positions of ``params`` in ``all_params``."""

    def __init__(self) -> None:
        self.all_params: list[Tensor] = []
        self.kinds: list[tuple] = []                # (dtype, device) of ``all_params`` when built (model.double()
        #                                             or .to(device) converts them in place: rebuilt, new buffers)
        self.has_grad: list[bool] = []
        self.params: list[Tensor] = []
        self.stepped: list[Tensor] = []
        self.index: list[int] = []
        self.flat = False
        self.state: Any = None
        self.dicts: list[Optional[dict]] = []     # state entries of ``stepped`` (None: no entry)
        self.sizes: list[int] = []
        self.base_keys: list[tuple[dict, Any]] = []  # (entry, key) of each base tensor of ``stepped``
        self.base_tensors: list[Tensor] = []
        self.copies: list[Tensor] = []            # the snapshot's storage, one per base tensor
        self._copy_groups: list[tuple[list[Tensor], Tensor]] = []  # (flattened views, flat copy) per dtype/device
        self._copy_rest: list[int] = []           # positions copied one by one (non-contiguous tensors)
        # flat mode: (the parameters' views followed by those of copy group k, the storage of w0 and its copy, k)
        self._joint: Optional[tuple[list[Tensor], Tensor, int]] = None
        self.w0: Optional[_Buffer] = None
        self.u: list[_Buffer] = []                # u[0], and u[1] with the secant (the previous direction)
        self.scratch: Optional[_Buffer] = None    # flat mode only: gradients flattened, w0 + a u
        self._param_pos: list[int] = []           # position of each of ``params`` in ``stepped``
        self.n_entries = 0                         # len(state) when built
        self.param_views: Optional[list[Tensor]] = None  # flat mode: ``p.view(-1)`` of each parameter
        self.param_ptrs: list[int] = []
        self.u_held: Optional[int] = None          # which u buffer state[p]["curvopt_u"] holds (None: not ours)
        self.installed: dict[str, int] = {}        # key -> id of the buffer whose views state[p][key] holds
        self.valid = False

    # -- each step ------------------------------------------------------------------------------------------
    def matches(self, state: Any, all_params: list[Tensor], has_grad: list[bool]) -> bool:
        """Whether the workspace still describes this step (cheap: identity checks)."""
        if not self.valid or state is not self.state or has_grad != self.has_grad:
            return False
        if len(all_params) != len(self.all_params) or not all(map(_is, all_params, self.all_params)):
            return False
        if _kinds(all_params) != self.kinds:
            return False
        if len(state) != self.n_entries or [len(d) if d is not None else -1 for d in self.dicts] != self.sizes:
            return False
        if not all(map(_is, [d[k] for d, k in self.base_keys], self.base_tensors)):
            return False
        if self.param_views is not None and list(map(Tensor.data_ptr, self.params)) != self.param_ptrs:
            self.param_views = None  # a parameter's storage was replaced (.data =): copy through the parameters
        return True

    def read_params(self, buf: "_Buffer") -> None:
        """``buf <- params`` (one concatenation when the parameters are contiguous)."""
        if buf.flat is not None and self.param_views is not None:
            torch.cat(self.param_views, out=buf.flat)
        else:
            torch._foreach_copy_(buf.views, self.params)

    @staticmethod
    def displacement_norms(w0: "_Buffer", u: "_Buffer") -> list[Tensor]:
        """``[||w0||, ||u||, ||w0|| over the entries u moves]`` (:func:`curvopt.rules.moved_entries`), the norms a
        finite-difference step is sized by (:func:`curvopt.rules.finite_difference_step`), as 0-d tensors (one
        fused norm kernel over the flat tensors)."""
        if w0.flat is not None and u.flat is not None:
            return flat_norms([w0.flat, u.flat, moved_entries(w0.flat, u.flat, torch)])
        return vector_norms(w0.views, u.views, [moved_entries(w, d, torch) for w, d in zip(w0.views, u.views)])

    def take_start(self) -> list[tuple[Tensor, Optional[dict]]]:
        """``w0 <- params`` and a copy of the base's tensors of the stepped parameters (one concatenation for
        ``w0`` and the copies of the parameters' dtype and device in flat mode); returns the entries to restore
        their keys."""
        joint = self._joint if self.param_views is not None else None
        if joint is not None:
            torch.cat(joint[0], out=joint[1])
        elif self.params:
            self.read_params(self.w0)
        for k, (views, flat) in enumerate(self._copy_groups):
            if joint is None or k != joint[2]:
                torch.cat(views, out=flat)
        rest = self._copy_rest
        if rest:
            torch._foreach_copy_([self.copies[i] for i in rest], [self.base_tensors[i] for i in rest])
        return [(p, d.copy() if d else None) for p, d in zip(self.stepped, self.dicts)]

    def restore_snapshot(self, state: Any, entries: list[tuple[Tensor, Optional[dict]]]) -> None:
        """The base's tensors and the stepped parameters' entries as taken (bit-exact copies)."""
        if self.base_tensors:
            torch._foreach_copy_(self.base_tensors, self.copies)
        for p, saved in entries:
            st = state.get(p)
            if saved is None:
                if st is not None:
                    del state[p]
            elif st is None:
                state[p] = saved
            else:
                st.clear()
                st.update(saved)
        self.valid = False

    def u_for_step(self, secant: bool) -> tuple[int, Optional[int]]:
        """``(buffer this step's u is written to, buffer holding the previous u or None)``. The previous
        direction is the buffer every parameter's ``state[p]["curvopt_u"]`` holds (ours after the first step;
        see :func:`build`). With the secant the new ``u`` goes to a buffer no state entry holds, so a failed
        step leaves the previous direction as it was; the fd oracle writes ``u[0]`` (``curvopt_u`` is scratch)."""
        if not secant:
            return 0, None
        prev = self.u_held
        if prev is not None:
            if len(self.u) < 2:
                self.u.append(_Buffer(self.params, self.flat))
            return 1 - prev, prev
        held = self._held_u()
        refs = {k for k, b in enumerate(self.u) for h, v in zip(held, b.views) if h is v} if held else set()
        for k in range(len(self.u)):
            if k not in refs:
                return k, None
        self.u.append(_Buffer(self.params, self.flat))
        return len(self.u) - 1, None

    def _held_u(self) -> list:
        """``state[p].get("curvopt_u")`` for every parameter ([] if a parameter has no state entry)."""
        dicts = self.dicts_of_params()
        if any(d is None for d in dicts):
            return []
        return [d.get(layout.U) for d in dicts]

    def u_in_state(self) -> Optional[int]:
        """Which of our u buffers ``state[p]["curvopt_u"]`` holds for every parameter (None: not one of ours)."""
        held = self._held_u()
        if not held:
            return None
        return next((k for k, b in enumerate(self.u) if all(map(_is, held, b.views))), None)

    def dicts_of_params(self) -> list[Optional[dict]]:
        return [self.dicts[i] for i in self._param_pos]

    def install(self, state: Any, key: str, buf: _Buffer) -> None:
        """``state[p][key] = view`` for every parameter (after the base stepped, so a lazily initialising base
        has seen an empty entry)."""
        if self.installed.get(key) == id(buf):
            return
        for i, (p, v) in enumerate(zip(self.params, buf.views)):
            d = self.dicts[self._param_pos[i]]
            if d is None:
                d = state[p]
            if d.get(key) is not v:
                d[key] = v
        self.installed[key] = id(buf)
        if key == layout.U:
            self.u_held = next(k for k, b in enumerate(self.u) if b is buf)


def build(old: Optional[Workspace], state: Any, all_params: list[Tensor], has_grad: list[bool], flat: bool,
          prefix: str = layout.PREFIX) -> Workspace:
    """A workspace for this step, reusing ``old``'s buffers where they still fit; our per-parameter keys in
    ``state`` that are not our buffers (a loaded state dict, the first steps) are copied into ours and replaced
    by our views (same values)."""
    ws = Workspace()
    ws.all_params = list(all_params)
    ws.kinds = _kinds(all_params)
    ws.has_grad = list(has_grad)
    ws.stepped = [p for p, g in zip(all_params, has_grad) if g]
    ws.index = [i for i, (p, g) in enumerate(zip(all_params, has_grad)) if g and p.numel() > 0]
    ws.params = [all_params[i] for i in ws.index]
    stepped_pos = {id(p): k for k, p in enumerate(ws.stepped)}
    ws._param_pos = [stepped_pos[id(p)] for p in ws.params]
    ws.flat = bool(flat) and bool(ws.params)
    ws.state = state
    params = ws.params
    same = (old is not None and old.flat == ws.flat and len(old.params) == len(params)
            and all(map(_is, old.params, params)) and old.kinds == ws.kinds)
    if same:
        ws.w0, ws.u, ws.scratch = old.w0, old.u, old.scratch
    elif params:
        ws.w0 = _Buffer(params, ws.flat)
        ws.u = [_Buffer(params, ws.flat)]
        ws.scratch = _Buffer(params, True) if ws.flat else None
    ws.dicts = [state.get(p) for p in ws.stepped]
    if params:
        _adopt(ws)
    ws.dicts = [state.get(p) for p in ws.stepped]
    ws.sizes = [len(d) if d is not None else -1 for d in ws.dicts]
    ws.n_entries = len(state)
    ws.u_held = ws.u_in_state() if params else None
    if ws.flat and all(p.is_contiguous() for p in params):
        ws.param_views = [p.detach().view(-1) for p in params]
        ws.param_ptrs = [p.data_ptr() for p in params]
    for d in ws.dicts:
        if not d:
            continue
        for k, v in d.items():
            if type(v) is Tensor and not (type(k) is str and k.startswith(prefix)):
                ws.base_keys.append((d, k))
                ws.base_tensors.append(v)
    _snapshot_storage(ws, old)
    ws.valid = True
    return ws


def _adopt(ws: Workspace) -> None:
    """Make the state's ``curvopt_w0``/``curvopt_u`` of the parameters our buffers' views, copying the values
    (of ``u``, the secant's memory, when every parameter holds one that fits; of each ``w0`` that fits); never
    adds a key."""
    dicts = ws.dicts_of_params()
    if any(d is None for d in dicts):
        return
    held = [d.get(layout.U) for d in dicts]
    if all(h is not None for h in held) and ws.u_in_state() is None:
        if all(fits(h, p) for h, p in zip(held, ws.params)):
            torch._foreach_copy_(ws.u[0].views, held)
            for d, v in zip(dicts, ws.u[0].views):
                d[layout.U] = v
    for d, v, p in zip(dicts, ws.w0.views, ws.params):
        if layout.W0 in d and d[layout.W0] is not v:
            if fits(d[layout.W0], p):  # its values too: a step that fails before writing w0 leaves them in state
                v.copy_(d[layout.W0])
            d[layout.W0] = v


def _snapshot_storage(ws: Workspace, old: Optional[Workspace]) -> None:
    """The snapshot's storage, one flat tensor per dtype and device; in flat mode the one of the parameters'
    dtype and device is allocated behind a fresh ``w0`` (see the module docstring)."""
    tensors = ws.base_tensors
    if (old is not None and old.w0 is ws.w0 and len(old.base_tensors) == len(tensors)
            and all(map(_is, old.base_tensors, tensors))):
        ws.copies, ws._copy_groups, ws._copy_rest = old.copies, old._copy_groups, old._copy_rest
        if old._joint is not None and ws.param_views is not None:
            k = old._joint[2]
            ws._joint = (ws.param_views + ws._copy_groups[k][0], old._joint[1], k)
        return
    groups: dict[tuple, list[int]] = {}
    rest = []
    for i, t in enumerate(tensors):
        if t.is_contiguous() and t.layout == torch.strided:
            groups.setdefault((t.dtype, t.device), []).append(i)
        else:
            rest.append(i)
    copies: list[Optional[Tensor]] = [None] * len(tensors)
    ws._copy_groups = []
    ws._joint = None
    joint_key = (ws.params[0].dtype, ws.params[0].device) if ws.flat and ws.param_views is not None else None
    for key, idx in groups.items():
        size = sum(tensors[i].numel() for i in idx)
        views_in = [tensors[i].view(-1) for i in idx]
        if key == joint_key:
            n = ws.w0.flat.numel()
            both = torch.empty(n + size, dtype=key[0], device=key[1])
            ws.w0 = _Buffer(ws.params, both[:n])
            flat = both[n:]
            ws._joint = (ws.param_views + views_in, both, len(ws._copy_groups))
        else:
            flat = torch.empty(size, dtype=key[0], device=key[1])
        for i, v in zip(idx, split_flat(flat, [tensors[i] for i in idx])):
            copies[i] = v
        ws._copy_groups.append((views_in, flat))
    for i in rest:
        copies[i] = torch.empty_like(tensors[i])
    ws.copies = copies  # type: ignore[assignment]
    ws._copy_rest = rest
