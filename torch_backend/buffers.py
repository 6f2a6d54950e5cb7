"""Leaving the model alone during probes: module buffers and the random number generators.

A tuner evaluates the closure more than once per step (a curvature probe at ``w + h u``, line-search trials,
power iterations for the sharpness). Only the first, *main* call may have side effects on the model:

* **Buffers.** BatchNorm's running statistics (and any other registered buffer) are snapshotted before and
  after the main call; every probe starts from the values the main call started from (a module whose forward
  reads what an earlier forward wrote, such as ``spectral_norm``'s power-iteration vectors, computes the same
  function in the probe as in the main call) and leaves them as the main call left them, so after N tuner steps
  they equal those after N steps of the bare base optimizer on the same batches. Pass the model (or a list of
  modules) as ``modules=`` to the tuner. Without it the tuner finds the modules that run in its first main
  call (:class:`RunSnapshot`: a global forward pre-hook for the length of that call, which sees every module
  called through ``Module.__call__``, a compiled model included) and uses them from then on. A module outside
  them that the closure starts calling later (an auxiliary head switched on after warm-up) is found by the same
  hook around each later main call and each probe, snapshotted before its first forward there and treated as the
  others from then on: a main call that finds it starts its probes from, and a step that fails puts it back to,
  the values it had before that call; one that only a probe finds is restored after the probe to the values the
  main call left. A module with neither buffers nor parameters (a loss module built in the closure) is not kept.
  ``modules=`` names every module the tuner keeps: the buffers of one outside them are left alone (a frozen
  teacher in distillation is not copied at every step), and count a batch at every closure call if it has
  BatchNorm statistics that it updates (its parameters' gradients are kept as below: the hook watches each main
  call for them).
* **Random numbers.** Each probe replays the generator states the main call started from (torch's and Python's
  ``random``'s: :class:`RNGSnapshot`), so dropout draws
  the same masks in the probe as in the main call (a finite difference across different masks would be
  meaningless), and after the step the generators are where the main call left them: the random stream of
  the training run is the one of the bare base optimizer.
* **Gradients of the other parameters.** The parameters of those modules, of any other module the main call
  runs (with ``modules=`` too), and any other leaf tensor the loss it returned was computed from (a raw tensor, a
  weight used through ``F.linear``: :func:`graph_leaves`), that the tuner does not step (a head under another
  optimizer, a GAN's other network) keep the gradients the main call left: each probe starts them
  from none and after the step they are the main call's tensors again, so an optimizer stepping them next reads
  the gradient at the point the main call saw (before, it read the last probe's, or the sum of the main call's
  and the probes' where the closure zeroed only the tuner's gradients). The tuner's own ``.grad`` are its
  business (:mod:`torch_backend.tuner`).
* **A main call that computes nothing.** A closure that returns None and leaves the parameters with the gradient
  tensors it found, no backward having accumulated into them (Lightning's manual optimization hands ``opt.step()``
  such a closure, ``do_nothing_closure``, wrapped in its hooks, which may clip or scale them in place), is no main
  call: the guard forgets it (:attr:`ProbeGuard.idle`) and the step is a closure-free one. A closure that ran a
  backward (into new gradient tensors or, after ``zero_grad(set_to_none=False)``, into the old ones) and returned
  None is a closure that forgot its loss.
"""
from __future__ import annotations

import itertools
import random
import threading
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.utils.hooks import RemovableHandle

from .freshness import GradientMarks
from .precision import computation_eps
from .vectors import least_precise_eps

__all__ = ["BufferSnapshot", "RunSnapshot", "RNGSnapshot", "ProbeGuard", "is_probe"]

#: True while a tuner runs the closure as a probe (a curvature probe, a line-search trial, a sharpness product)
_PROBING: ContextVar[bool] = ContextVar("curvopt_probing", default=False)


def is_probe() -> bool:
    """Whether the closure is being called as a *probe* (``curvopt.torch.is_probe()``, or ``opt.probing``).

    False during the main call of a step (the one at the current parameters, whose loss and gradient the step
    uses) and outside any step; True while a tuner calls the closure again at a probe point. A closure can use
    it to skip side effects that must happen once per step (logging, counters, drawing the next batch)::

        def closure():
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            if not curvopt.torch.is_probe():
                log(loss.item())
            return loss
    """
    return _PROBING.get()

ModulesLike = Optional[Union[nn.Module, Iterable[nn.Module]]]

#: what the global forward pre-hook of :func:`_watching` calls for each module about to run (None: nothing)
_WATCHER: ContextVar[Optional[Callable[[nn.Module], None]]] = ContextVar("curvopt_watcher", default=None)
#: the key the hook is installed under, reserved once: ``torch.compile`` guards a compiled forward on the global
#: hooks' keys and functions, so a fresh registration at every call would recompile it at every call
_HOOK_KEY = RemovableHandle(nn.modules.module._global_forward_pre_hooks).id
#: how many :func:`_watching` blocks are open, in every thread (the hook goes when the last one closes)
_OPEN = [0]
_OPEN_LOCK = threading.Lock()


def _on_forward(module: nn.Module, args) -> None:
    if torch.compiler.is_compiling():  # a compiled model's inlined layers: its wrapper's call, eager, saw them
        return
    watcher = _WATCHER.get()
    if watcher is not None:
        watcher(module)


@contextmanager
def _watching(watcher: Callable[[nn.Module], None]) -> Iterator[None]:
    """For the length of the block, ``watcher(module)`` before the forward of each module called through
    ``Module.__call__``: one global forward pre-hook, the same function under the same key every time. A block
    opened inside another (a tuner stepped from another's closure) chains to the outer watcher, which still sees
    every module run in its block."""
    hooks = nn.modules.module._global_forward_pre_hooks
    outer = _WATCHER.get()
    if outer is not None:
        inner = watcher

        def watcher(module: nn.Module) -> None:
            inner(module)
            outer(module)

    token = _WATCHER.set(watcher)
    with _OPEN_LOCK:
        _OPEN[0] += 1
        hooks[_HOOK_KEY] = _on_forward
    try:
        yield
    finally:
        _WATCHER.reset(token)
        with _OPEN_LOCK:
            _OPEN[0] -= 1
            if not _OPEN[0]:
                hooks.pop(_HOOK_KEY, None)


@contextmanager
def _first_runs(known: frozenset[int], found: Callable[[nn.Module], None]) -> Iterator[None]:
    """For the length of the block, ``found(module)`` before the forward of each module that runs outside
    ``known`` (ids) and the trees of the modules found before it (:func:`_watching`)."""
    covered: set[int] = set(known)

    def first_run(module: nn.Module) -> None:
        if id(module) not in covered:
            covered.update(id(m) for m in module.modules())
            found(module)

    with _watching(first_run):
        yield


def _as_modules(modules: ModulesLike) -> list[nn.Module]:
    if modules is None:
        return []
    if isinstance(modules, nn.Module):
        return [modules]
    out = list(modules)
    for m in out:
        if not isinstance(m, nn.Module):
            raise TypeError(f"modules must be a torch.nn.Module or a list of them, got {type(m).__name__}")
    return out


def _each_module(modules: list[nn.Module]) -> Iterator[nn.Module]:
    """``modules`` and their submodules, each once, pre-order (as ``Module.modules()``; a direct walk of
    ``_modules``: the generators of ``modules()`` and ``buffers()`` cost more than the work done per step)."""
    seen: set[int] = set()
    stack: list = modules[::-1]
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        yield m
        if m._modules:
            stack.extend(reversed(m._modules.values()))


class BufferSnapshot:
    """Copies of every buffer of ``modules``; the storage is allocated once and reused."""

    def __init__(self, modules: ModulesLike) -> None:
        self.modules = _as_modules(modules)
        self._copies: list[Tensor] = []
        self._live: list[Tensor] = []
        self._slots: list[tuple[dict, str, Tensor]] = []

    def _buffers(self) -> list[tuple[dict, str, Tensor]]:
        """``(module._buffers, name, tensor)`` of every buffer of the modules and their submodules, once each, in
        ``Module.buffers()`` order; a lazy module's buffer before its first forward has no value to keep and is
        left out (its module's own hook, which runs after the global one that takes the snapshot, creates it)."""
        out: list[tuple[dict, str, Tensor]] = []
        for m in _each_module(self.modules):
            if m._buffers:
                out.extend((m._buffers, k, b) for k, b in m._buffers.items() if b is not None and not is_lazy(b))
        if len(out) > 1 and len({id(b) for _, _, b in out}) < len(out):  # a buffer shared by modules: the first
            first: dict[int, tuple[dict, str, Tensor]] = {}
            for slot in out:
                first.setdefault(id(slot[2]), slot)
            out = list(first.values())
        return out

    def take(self) -> None:
        """Remember the current buffers: their values, and which tensor each module holds."""
        self._slots = self._buffers()
        live = [b for _, _, b in self._slots]
        if len(live) != len(self._copies) or any(
            c.shape != b.shape or c.dtype != b.dtype or c.device != b.device for c, b in zip(self._copies, live)
        ):
            self._copies = [b.detach().clone() for b in live]
        elif live:
            with torch.no_grad():
                torch._foreach_copy_(self._copies, live)
        self._live = live

    def restore(self) -> None:
        """Write the remembered values back (bit-exact copies), into the tensors the modules held: a forward pass
        that reassigns a buffer (``self.ema = 0.9 * self.ema + ...``) instead of writing it in place gets the
        remembered tensor back, and one that resizes a buffer in place (``resize_``) its size back."""
        for d, k, b in self._slots:
            if d.get(k) is not b:
                d[k] = b
        if self._live:
            with torch.no_grad():
                for b, c in zip(self._live, self._copies):
                    if b.shape != c.shape:
                        b.resize_(c.shape)
                torch._foreach_copy_(self._live, self._copies)


class RunSnapshot:
    """The buffers of the modules that run during a call, as they were before the call (:meth:`watch`): how a
    tuner given no ``modules=`` finds them."""

    def __init__(self) -> None:
        #: the outermost modules that ran during the watched call, in the order they first ran
        self.modules: list[nn.Module] = []
        #: whether the watched call ran to its end (else ``modules`` may be a part of what it calls)
        self.complete = False
        self._taken: list[BufferSnapshot] = []

    @contextmanager
    def watch(self, known: frozenset[int] = frozenset()) -> Iterator[None]:
        """For the length of the block, a global forward pre-hook snapshots the buffers of each module, and of
        its submodules (a compiled model's inlined ones too), when it is the first of its tree to run; modules
        whose ``id`` is in ``known`` are left out, and so are those with neither buffers nor parameters."""
        self.modules, self._taken, self.complete = [], [], False

        def take(module: nn.Module) -> None:
            if next(module.buffers(), None) is None and next(module.parameters(), None) is None:
                return  # nothing to keep (a loss module built in the closure at every call: never adopted)
            snap = BufferSnapshot(module)
            snap.take()
            self.modules.append(module)
            self._taken.append(snap)

        # (torch.compile's wrapper warns, once, that a global hook fires for it as well: this one expects that; a
        # filter against the warning would reset every once-only warning of the process)
        with _first_runs(known, take):
            yield
        self.complete = True

    def restore(self) -> None:
        """The buffers as they were before the watched call: the snapshots written back last to first, so that
        a module that ran before its parent gets its values from before it ran."""
        for snap in reversed(self._taken):
            snap.restore()


def graph_leaves(loss: Optional[Tensor]) -> list[Tensor]:
    """The leaf tensors ``loss``'s autograd graph accumulates gradients into (its ``AccumulateGrad`` nodes' tensors;
    the graph's structure outlives a ``backward()`` that freed its saved tensors); none for a loss without a graph."""
    fn = getattr(loss, "grad_fn", None)
    seen, todo, out = set(), [fn] if fn is not None else [], []
    while todo:
        fn = todo.pop()
        if fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "AccumulateGrad":  # (a custom Function's node is its ctx: any attribute names)
            out.append(fn.variable)
        todo.extend(f for f, _ in fn.next_functions if f is not None)
    return out


class RNGSnapshot:
    """The CPU generator state, those of the CUDA devices in use and Python's ``random`` module's (the seq2seq
    habit of teacher forcing by ``random.random() < ratio``: not replayed, a scheduled ratio leaving 1 cut CDAT's
    rate 2e5x from that step on, unwarned once the first steps' replay checks had passed). NumPy's global
    generator is not kept: its state takes ~0.1 ms to read or write, several times a step."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.python = random.getstate()

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)


class ProbeGuard:
    """Wraps the main closure call and the probe calls of one step (see the module docstring).

    Usage: ``loss = guard.main(closure, owned)`` once (``owned``: the parameters the caller steps), then any
    number of ``guard.probe(closure)``, then ``guard.finish()`` — or ``guard.rollback()`` when the step fails:
    the buffers and the generators go back to where they were before the main call. Either way the other
    parameters' gradients are the main call's. ``calls`` counts the closure calls since ``main``.
    """

    def __init__(self, modules: ModulesLike = None) -> None:
        #: the buffers before the main call: of ``modules``; without them, of the modules found running in the
        #: first main call that returned (:class:`RunSnapshot`), and from the next step on as if they were passed
        self._given = modules is not None
        self.before: Union[BufferSnapshot, RunSnapshot] = BufferSnapshot(modules) if self._given else RunSnapshot()
        self.buffers = BufferSnapshot(modules)
        self._rng_before: Optional[RNGSnapshot] = None
        self._rng_after: Optional[RNGSnapshot] = None
        self._taken = False
        self.calls = 0
        self._main_called = False
        #: ids of the modules whose buffers ``self.buffers`` covers, their submodules included (None: not counted
        #: since the modules last changed); without ``modules=``, probes look for modules outside them
        self._known: Optional[frozenset[int]] = None
        #: the machine epsilon of the closure's least precise computation (:mod:`torch_backend.precision`), read
        #: on the first main call; None before
        self.compute_eps: Optional[float] = None
        #: the parameters the caller steps (their gradients are left alone), and, once a probe ran this step,
        #: every other parameter of the modules with the gradient the main call left it
        self._owned: Sequence[Tensor] = ()
        self._grads: list[tuple[Tensor, Optional[Tensor]]] = []
        #: the loss the main call returned, whose graph reaches the other leaf tensors (None: none, or not a tensor)
        self._loss: Optional[Tensor] = None
        #: the last main call returned None, ran no backward into the parameters the caller steps and left them the
        #: gradient tensors it found: it was forgotten as if there had been none (:meth:`no_main`), the step is the
        #: caller's to take closure-free
        self.idle = False
        #: the modules outside those known that this step's main call ran, as they were before it (None: none)
        self._new: Optional[RunSnapshot] = None
        #: with ``modules=``: the modules outside them that this step's main call ran (their buffers are left
        #: alone; their other parameters' gradients are kept like those of the modules given)
        self._outside: list[nn.Module] = []

    def no_main(self) -> None:
        """A closure-free step: no main call, nothing of the model to undo on a rollback."""
        self.idle = False
        self._rng_before = self._rng_after = None
        self._taken = False
        self.calls = 0
        self._main_called = False
        self._new = None
        self._outside = []
        self._loss = None

    def main(self, closure, owned: Sequence[Tensor] = ()) -> Tensor:
        self._main_called = True
        self._owned = owned
        self._grads = []
        self._rng_before = RNGSnapshot()
        self._rng_after = None
        self._taken = False
        self.calls = 0
        self.idle = False
        if isinstance(self.before, RunSnapshot) and self.before.complete:
            self.before = BufferSnapshot(self.before.modules)
        finding = isinstance(self.before, RunSnapshot)
        self._new = None if finding or self._given else RunSnapshot()
        self._outside = []
        if not finding:
            self.before.take()
        marks = GradientMarks()
        marks.take(owned)
        accumulated: list[Tensor] = []  # parameters a backward in the call accumulated a gradient into
        handles = [p.register_post_accumulate_grad_hook(accumulated.append) for p in owned
                   if p.requires_grad and not is_lazy(p)]  # (a lazy module's parameter takes no hook until it runs)
        eps_before = self.compute_eps
        if finding:  # the first main call: every module it runs
            watch = self.before.watch()
        elif self._new is not None:  # the modules it runs beyond those found
            watch = self._new.watch(self._known_modules())
        else:  # modules= given: those outside them, for their parameters' gradients
            watch = _first_runs(self._known_modules(), self._outside.append)
        try:
            with torch.enable_grad(), watch:
                if self.compute_eps is None:
                    loss, self.compute_eps = computation_eps(closure)
                else:
                    loss = closure()
        finally:
            for handle in handles:
                handle.remove()
        self._loss = loss if isinstance(loss, Tensor) else None
        if loss is None and not accumulated and marks.same_tensors(owned):
            # nothing ran that the step could use: no modules found, no precision read, nothing to undo
            self.compute_eps = eps_before
            if finding:
                self.before = RunSnapshot()
            self.no_main()
            self.idle = True
            return loss
        if finding:
            self.buffers.modules = self.before.modules
            self._known = None
        elif self._new is not None and self._new.modules:
            self._adopt(self._new.modules)
        self.calls = 1
        return loss

    @property
    def modules_run(self) -> list[nn.Module]:
        """The modules kept (found, or ``modules=``) and those outside them that the last main call ran (with
        ``modules=`` the inner model, the ``DistributedDataParallel`` wrapper the closure calls)."""
        return self.buffers.modules + self._outside

    def fd_eps(self, params: Iterable[Tensor]) -> float:
        """The epsilon a finite-difference displacement of ``params`` is sized by: of the least precise dtype among
        them and the closure's own computation (a bf16 autocast: :attr:`compute_eps`)."""
        return max(least_precise_eps(params), self.compute_eps or 0.0)

    def probe(self, closure) -> Tensor:
        """Call ``closure`` as a probe (counted in ``calls``)."""
        with torch.enable_grad():
            return self.protect(closure)

    def protect(self, fn):
        """Run ``fn`` from the buffers and the random state the main call started from; afterwards the buffers
        are as the main call left them."""
        if not self._taken:
            self.buffers.take()
            self._rng_after = RNGSnapshot()
            self._taken = True
            if self._main_called:
                self._grads = self._other_gradients()
        for p, _ in self._grads:
            p.grad = None
        if self._main_called:
            self._restore_before()
        if self._rng_before is not None:
            self._rng_before.restore()
        late = None if self._given else RunSnapshot()  # modules first called now (not found in a main call)
        token = _PROBING.set(True)
        try:
            with nullcontext() if late is None else late.watch(self._known_modules()):
                out = fn()
        except RuntimeError as err:
            if "modified by an inplace operation" in str(err):
                why = ("because the tuner moved the parameters in place to the probe point: the closure must build "
                       "its forward pass anew at every call (a graph built outside it, kept with retain_graph=True, "
                       "still refers to the parameters' old versions)")
            elif "backward through the graph a second time" in str(err):
                why = ("through a graph built before it and freed (by an earlier call of the closure, or outside it: "
                       "build the forward pass inside the closure)")
            else:
                raise
            raise RuntimeError(
                f"curvopt: the closure's backward failed in a probe {why}. Where the closure reads state that an "
                "earlier call wrote (an RNN's hidden state carried across batches), read a detached copy taken "
                "before opt.step (h_in = hidden.detach()) and write the new state only in the main call (if not "
                f"curvopt.torch.is_probe(): hidden = h_out). torch said: {err}") from err
        finally:
            _PROBING.reset(token)
            self.buffers.restore()
            if late is not None and late.modules:
                late.restore()
                self._adopt(late.modules)
        self.calls += 1
        return out

    def _other_gradients(self) -> list[tuple[Tensor, Optional[Tensor]]]:
        """``(p, p.grad)`` of every parameter of the modules (and of those outside ``modules=`` that the main call
        ran) and of every other leaf tensor the main call's loss was computed from (a raw tensor, a weight used
        through ``F.linear`` of a module the closure does not call) that requires a gradient and is not
        ``owned``."""
        skip = {id(p) for p in self._owned}
        module_params = (p for m in _each_module(self.buffers.modules + self._outside) for p in m._parameters.values())
        out = []
        for p in itertools.chain(module_params, graph_leaves(self._loss)):
            if p is not None and p.requires_grad and id(p) not in skip:
                skip.add(id(p))  # a parameter shared by modules: once
                out.append((p, p.grad))
        return out

    def _restore_gradients(self) -> None:
        for p, g in self._grads:
            p.grad = g
        self._grads = []
        self._loss = None

    def _known_modules(self) -> frozenset[int]:
        if self._known is None:
            self._known = frozenset(id(m) for root in self.buffers.modules for m in root.modules())
        return self._known

    def _adopt(self, modules: list[nn.Module]) -> None:
        """Make modules a main call or a probe found running part of the snapshots: from this step's next probe
        on (``self.buffers`` taken again: every buffer as the main call left it, a probe's just restored) and from
        the next main call on (``self.before``)."""
        self.buffers.modules.extend(modules)
        if self.before.modules is not self.buffers.modules:
            self.before.modules.extend(modules)
        self._known = None
        self.buffers.take()

    def _restore_before(self) -> None:
        """The buffers as they were before the main call, of the modules it found too."""
        self.before.restore()
        if self._new is not None:
            self._new.restore()

    def finish(self) -> None:
        """Put the generators where the main call left them, and the other parameters' gradients."""
        self._restore_gradients()
        if self._rng_after is not None:
            self._rng_after.restore()
        self._rng_after = None
        self._taken = False

    def rollback(self, skipped: bool = False) -> None:
        """Undo the step's side effects on the model: buffers and generators as before the main call (the other
        parameters' gradients as the main call left them). ``skipped`` (a step the tuner skips, its loss or
        gradient not finite): the generators where the main call left them instead, the probes' draws undone, as
        a bare loop leaves them: put back to before the main call, a closure whose random draw gave the NaN (a
        batch drawn with ``random`` or ``torch.randint``, an augmentation) drew it again at every step, each
        skipped."""
        self._restore_gradients()
        if self._main_called:
            self._restore_before()
        rng = self._rng_after if skipped else self._rng_before
        if rng is not None:
            rng.restore()
        self._rng_after = None
        self._taken = False

    def __getstate__(self) -> dict:
        # the snapshots are scratch of one step; the modules are what matters (None: a copy finds them anew)
        return {"modules": self.before.modules if self._given else None}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["modules"])
