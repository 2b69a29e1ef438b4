"""Device sampling: psutil for real; NVML through a small fake ``pynvml`` module (no GPU here)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import types

import psutil
import pytest

from engine.devices import DeviceSampler, clamp_interval, describe_gpus, visible_gpu_indices


class NVMLError(Exception):
    pass


def fake_pynvml(our_pids=(), fail_init=False, gpus=2):
    """A pynvml-compatible module: GPU 0 supports everything, GPU 1 has no power reading."""
    nv = types.ModuleType("pynvml")
    nv.NVMLError = NVMLError
    nv.NVML_TEMPERATURE_GPU = 0
    nv.calls = {"init": 0}

    def init():
        nv.calls["init"] += 1
        if fail_init:
            raise NVMLError("NVML Shared Library Not Found")

    def power(handle):
        if handle == 1:
            raise NVMLError("Not Supported")
        return 150_000  # mW

    def procs(handle):
        if handle == 1:
            return []
        entries = [types.SimpleNamespace(pid=pid, usedGpuMemory=512 * 2**20) for pid in our_pids]
        entries.append(types.SimpleNamespace(pid=999_999_999, usedGpuMemory=2**30))  # not ours
        return entries

    nv.nvmlInit = init
    nv.nvmlShutdown = lambda: None
    nv.nvmlDeviceGetCount = lambda: gpus
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetName = lambda h: b"Fake GPU 80GB"
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=55 + h, memory=10)
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(
        used=(10 + h) * 2**30, total=80 * 2**30, free=(70 - h) * 2**30)
    nv.nvmlDeviceGetPowerUsage = power
    nv.nvmlDeviceGetTemperature = lambda h, sensor: 60 + h
    nv.nvmlDeviceGetComputeRunningProcesses = procs
    return nv


@pytest.fixture
def busy_child():
    """A child that holds ~80 MB and keeps one core busy, plus a grandchild."""
    code = (
        "import subprocess, sys, time\n"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
        "block = bytearray(80 * 2**20)\n"
        "for i in range(0, len(block), 4096): block[i] = 1\n"
        "print('ready', g.pid, flush=True)\n"
        "end = time.time() + 30\n"
        "while time.time() < end: pass\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line[0] == "ready"
    yield proc, int(line[1])
    for p in psutil.Process(proc.pid).children(recursive=True):
        p.kill()
    proc.kill()
    proc.wait()


def test_host_sample_measures_the_whole_process_tree(busy_child):
    proc, grandchild = busy_child
    sampler = DeviceSampler(root_pid=proc.pid, interval=0.25, use_nvml=False)
    time.sleep(0.6)
    batch = sampler.sample()
    assert [s.device for s in batch] == ["host"]
    host = batch[0]
    rss = sum(psutil.Process(p).memory_info().rss for p in (proc.pid, grandchild))
    assert host.proc_mem >= 80 * 2**20
    assert host.proc_mem_peak >= host.proc_mem  # the kernel's high-water mark
    assert abs(host.proc_mem - rss) < 16 * 2**20
    assert 40.0 <= host.util <= 210.0  # one busy core, measured since the previous sample
    vm = psutil.virtual_memory()
    assert host.mem_total == vm.total
    assert 0 < host.mem_used < vm.total
    assert host.power_w is None and host.temp_c is None


def test_nvml_is_lazy_and_reports_each_gpu(busy_child):
    proc, grandchild = busy_child
    nv = fake_pynvml(our_pids=[proc.pid, grandchild])
    sampler = DeviceSampler(root_pid=proc.pid, interval=2.0, nvml=nv)
    assert nv.calls["init"] == 0  # nothing touches NVML before the first sample
    batch = sampler.sample()
    sampler.sample()
    assert nv.calls["init"] == 1
    gpus = {s.device: s for s in batch if s.kind == "gpu"}
    assert set(gpus) == {"gpu0", "gpu1"}
    g0, g1 = gpus["gpu0"], gpus["gpu1"]
    assert (g0.util, g0.mem_used, g0.mem_total, g0.power_w, g0.temp_c) == (
        55.0, 10 * 2**30, 80 * 2**30, 150.0, 60.0)
    assert g0.proc_mem == 2 * 512 * 2**20  # our two processes, not the foreign one
    assert g1.power_w is None  # unsupported metric: None, not a crash
    assert g1.proc_mem == 0 and g1.util == 56.0
    assert describe_gpus(nv)[0] == {"index": 0, "name": "Fake GPU 80GB", "mem_total": 80 * 2**30}


def test_foreign_pids_only_means_unknown_run_memory():
    # In a container NVML lists host pids: report unknown rather than a wrong zero.
    nv = fake_pynvml(our_pids=[])
    batch = DeviceSampler(root_pid=os.getpid(), nvml=nv).sample()
    assert batch[1].device == "gpu0" and batch[1].proc_mem is None


def test_without_nvml_only_the_host_is_sampled():
    nv = fake_pynvml(fail_init=True)
    sampler = DeviceSampler(root_pid=os.getpid(), nvml=nv)
    batch = sampler.sample()
    assert [s.kind for s in batch] == ["host"]
    assert sampler.gpu_available is False
    assert "Not Found" in sampler.nvml_error
    sampler.sample()
    assert nv.calls["init"] == 1  # not retried at every sample


def test_visible_devices_restrict_the_gpus():
    assert visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "1"}) == [1]
    assert visible_gpu_indices({"CUDA_VISIBLE_DEVICES": "GPU-3f2a"}) is None
    assert visible_gpu_indices({}) is None
    batch = DeviceSampler(nvml=fake_pynvml(), gpu_indices=[1]).sample()
    assert [s.device for s in batch] == ["host", "gpu1"]
    assert batch[0].proc_mem is None  # no process tree given


def test_interval_is_clamped_and_poll_respects_it():
    assert clamp_interval(None) == 2.0
    assert clamp_interval(0.01) == 0.25
    assert clamp_interval(float("nan")) == 2.0
    assert clamp_interval(5) == 5.0
    sampler = DeviceSampler(interval=0.1, use_nvml=False)
    assert sampler.interval == 0.25
    assert len(sampler.poll(now=100.0)) == 1
    assert sampler.poll(now=100.2) == []
    assert len(sampler.poll(now=100.26)) == 1


def test_background_thread_keeps_the_latest_batch():
    seen = []
    sampler = DeviceSampler(root_pid=os.getpid(), interval=0.25, use_nvml=False)
    sampler.start(seen.append)
    time.sleep(0.7)
    sampler.stop()
    assert 2 <= len(seen) <= 4
    assert sampler.latest()[0].device == "host"
    assert sampler.latest()[0].t == seen[-1][0].t
