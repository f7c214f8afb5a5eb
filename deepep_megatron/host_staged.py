"""A torch.distributed backend for CUDA tensors of ranks that share one GPU: gloo through host memory.

NCCL refuses two ranks on one GPU, and gloo refuses some collectives on CUDA tensors
(``allreduce_coalesced``, which megatron-core's DDP issues for its gradient buckets, among them). So
ranks sharing a GPU under MPS (several EP ranks on one GPU, virtual nodes) cannot train with either.
This backend, registered as :data:`BACKEND_NAME` for CUDA tensors beside gloo for CPU tensors
(``init_process_group(backend_string())`` = ``"cpu:gloo,cuda:deepep_host_gloo"``), runs every
collective on host copies over an inner gloo group and copies the results back: slow, and equal to
what NCCL computes (reductions in fp32/fp64 on the host where gloo does them, ``AVG`` as a sum
divided by the group size, ``reduce_scatter`` as an all-reduce of which each rank keeps its slice).

Each call finishes before it returns (its ``Work`` is complete), so stream ordering stays what it is
around a synchronous copy: ``tensor.cpu()`` waits for the current stream's work on the tensor.

Set ``DEEPEP_MEGATRON_STAGE_CPU=1`` to stage CPU tensors too when this backend is registered for
the CPU (``"cpu:deepep_host_gloo"``): the tests run every code path of this module that way on a
machine without a GPU.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Work
from torch.futures import Future

BACKEND_NAME = "deepep_host_gloo"
STAGE_CPU_ENV = "DEEPEP_MEGATRON_STAGE_CPU"
_registered = False


def backend_string() -> str:
    """The ``init_process_group`` backend for ranks sharing GPUs: gloo for CPU tensors, this
    backend for CUDA tensors (registered first by :func:`register`); with ``DEEPEP_MEGATRON_STAGE_CPU=1``
    this backend for CPU tensors too."""
    register()
    cpu = BACKEND_NAME if os.environ.get(STAGE_CPU_ENV) == "1" else "gloo"
    return f"cpu:{cpu},cuda:{BACKEND_NAME}"


def register() -> None:
    """Make :data:`BACKEND_NAME` known to torch.distributed (once per process)."""
    global _registered
    if not _registered:
        dist.Backend.register_backend(BACKEND_NAME, HostStagedProcessGroup, devices=["cpu", "cuda"])
        _registered = True


class _DoneWork(Work):
    """The handle of a collective that already finished."""

    def __init__(self, result: Any) -> None:
        super().__init__()
        self._future: Future = Future()
        self._future.set_result(result)

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True

    def get_future(self) -> Future:
        return self._future


class HostStagedProcessGroup(dist.ProcessGroup):
    """Collectives on host copies over an inner gloo group (see the module docstring)."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: datetime.timedelta) -> None:
        super().__init__(rank, size)
        self._group_name = ""  # set by torch right after creation (_set_group_name)
        self._gloo = dist.ProcessGroupGloo(dist.PrefixStore(BACKEND_NAME, store), rank, size, timeout)
        self._stage_cpu = os.environ.get(STAGE_CPU_ENV) == "1"

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return BACKEND_NAME

    # torch uses a ProcessGroup subclass returned by a backend's creator as the whole group, which then
    # has no C++ backend to keep the name torch gives it: without these two, ``group_name`` raises
    # "ProcessGroup name not set" and ``destroy_process_group`` of a subgroup fails.
    def _set_group_name(self, name: str) -> None:
        self._group_name = name

    @property
    def group_name(self) -> str:
        return self._group_name

    def name(self) -> str:
        return BACKEND_NAME

    # ------------------------------------------------------------------ staging
    def _host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of ``tensor`` that gloo may write (always a copy: results are copied back)."""
        if tensor.device.type == "cpu" and not self._stage_cpu:
            return tensor
        return tensor.detach().to("cpu", copy=True).contiguous()

    @staticmethod
    def _back(targets: Sequence[torch.Tensor], hosts: Sequence[torch.Tensor]) -> None:
        for target, host in zip(targets, hosts):
            if target is not host:
                target.copy_(host)

    def _reduce_on_host(self, tensors: list[torch.Tensor], op: dist.ReduceOp) -> list[torch.Tensor]:
        """Host copies of ``tensors`` all-reduced with ``op`` (AVG: SUM over the group / size; integers
        floor-divided). Tensors of one dtype travel as one flat gloo all-reduce."""
        average = op == dist.ReduceOp.AVG
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.SUM if average else op
        hosts: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
        for dtype in dict.fromkeys(t.dtype for t in tensors):
            members = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            flat = torch.cat([tensors[i].detach().reshape(-1).to("cpu") for i in members])
            self._gloo.allreduce([flat], options).wait()
            if average:
                flat = flat / self.size() if flat.is_floating_point() else flat.div(self.size(), rounding_mode="floor")
            for i, part in zip(members, flat.split([tensors[i].numel() for i in members])):
                hosts[i] = part.view(tensors[i].shape)
        return hosts

    # ------------------------------------------------------------------ reductions
    def allreduce(self, tensors: list[torch.Tensor], opts: Any) -> Work:
        self._back(tensors, self._reduce_on_host(tensors, opts.reduceOp))
        return _DoneWork(tensors)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any) -> Work:
        return self.allreduce(tensors, opts)

    def reduce(self, tensors: list[torch.Tensor], opts: Any) -> Work:
        hosts = self._reduce_on_host(tensors, opts.reduceOp)
        if self.rank() == opts.rootRank:
            self._back(tensors, hosts)
        return _DoneWork(tensors)

    def _reduce_scatter_into(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], op: dist.ReduceOp) -> None:
        """``outputs[i]`` = this rank's slice (dim 0) of the reduction of ``inputs[i]`` [size * n, ...]."""
        reduced = self._reduce_on_host([t.reshape(self.size(), -1) for t in inputs], op)
        for output, host in zip(outputs, reduced):
            output.copy_(host[self.rank()].view(output.shape))

    def _reduce_scatter_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any) -> Work:  # noqa: A002
        self._reduce_scatter_into([output], [input], opts.reduceOp)
        return _DoneWork([output])

    def reduce_scatter_tensor_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any) -> Work:
        self._reduce_scatter_into(outputs, inputs, opts.reduceOp)
        return _DoneWork(outputs)

    def reduce_scatter(self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any) -> Work:
        stacked = [torch.stack([t.reshape(-1) for t in chunks]) for chunks in inputs]
        self._reduce_scatter_into(outputs, stacked, opts.reduceOp)
        return _DoneWork(outputs)

    # ------------------------------------------------------------------ gathers, broadcast, all-to-all
    def _gather_into(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> None:
        """``outputs[i]`` [size * n, ...] = every rank's ``inputs[i]`` [n, ...] in rank order."""
        for output, tensor in zip(outputs, inputs):
            host_in = self._host(tensor)
            host_out = [torch.empty(host_in.shape, dtype=host_in.dtype) for _ in range(self.size())]
            self._gloo.allgather([host_out], [host_in]).wait()
            output.copy_(torch.cat([h.reshape(-1) for h in host_out]).view(output.shape))

    def _allgather_base(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Work:  # noqa: A002
        self._gather_into([output], [input])
        return _DoneWork([output])

    def allgather_into_tensor_coalesced(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None) -> Work:
        self._gather_into(outputs, inputs)
        return _DoneWork(outputs)

    def allgather(self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None) -> Work:
        for outputs, tensor in zip(output_lists, inputs):
            flat = torch.empty((self.size(), tensor.numel()), dtype=tensor.dtype, device=tensor.device)
            self._gather_into([flat], [tensor.reshape(1, -1)])
            for r, output in enumerate(outputs):
                output.copy_(flat[r].view(output.shape))
        return _DoneWork(output_lists)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any) -> Work:
        hosts = [self._host(t) for t in tensors]
        self._gloo.broadcast(hosts, opts).wait()
        self._back(tensors, hosts)
        return _DoneWork(tensors)

    def alltoall_base(
        self, output: torch.Tensor, input: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int], opts: Any  # noqa: A002
    ) -> Work:
        host_in, host_out = self._host(input), self._host(output)
        self._gloo.alltoall_base(host_out, host_in, output_split_sizes, input_split_sizes, opts).wait()
        self._back([output], [host_out])
        return _DoneWork([output])

    def alltoall(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any) -> Work:
        host_in, host_out = [self._host(t) for t in inputs], [self._host(t) for t in outputs]
        self._gloo.alltoall(host_out, host_in, opts).wait()
        self._back(outputs, host_out)
        return _DoneWork(outputs)

    # torch renamed these collectives (2.13: *_single); megatron-core and older torch call the old names.
    reduce_scatter_single = _reduce_scatter_base
    reduce_scatter_single_coalesced = reduce_scatter_tensor_coalesced
    all_gather_single = _allgather_base
    all_gather_single_coalesced = allgather_into_tensor_coalesced
    all_to_all_single = alltoall_base

    def gather(self, output_lists: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any) -> Work:
        root = self.rank() == opts.rootRank
        host_in = [self._host(t) for t in inputs]
        host_out = [[self._host(t) for t in outputs] for outputs in output_lists] if root else []
        self._gloo.gather(host_out, host_in, opts).wait()
        for outputs, hosts in zip(output_lists if root else [], host_out):
            self._back(outputs, hosts)
        return _DoneWork(output_lists)

    def scatter(self, outputs: list[torch.Tensor], input_lists: list[list[torch.Tensor]], opts: Any) -> Work:
        root = self.rank() == opts.rootRank
        host_out = [self._host(t) for t in outputs]
        host_in = [[self._host(t) for t in inputs] for inputs in input_lists] if root else []
        self._gloo.scatter(host_out, host_in, opts).wait()
        self._back(outputs, host_out)
        return _DoneWork(outputs)

    def barrier(self, opts: Any = None) -> Work:
        self._gloo.barrier(dist.BarrierOptions()).wait()
        return _DoneWork(None)

    # ------------------------------------------------------------------ point to point
    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> Work:
        self._gloo.send([self._host(t) for t in tensors], dst, tag).wait()
        return _DoneWork(tensors)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> Work:
        hosts = [self._host(t) for t in tensors]
        self._gloo.recv(hosts, src, tag).wait()
        self._back(tensors, hosts)
        return _DoneWork(tensors)
