"""Codegen: a `KernelKey` with its schedule -> TileLang prim_func -> compiled kernel for a target.

Each kernel kind (`nsa_codegen.kinds`) has one template family in templates/; its config dataclass
is filled from the key's problem parameters (under the names the template uses) and the schedule's knobs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

from .kernel_key import SHARED_MEMORY, KernelKey
from .kinds import KINDS
from .resources import template_module

# sm80 kernels carry sm_90 code as well (the same sm_80 PTX, assembled for both): they then run on an
# H100 too, where NSA_CODEGEN_ARCH=sm80 (lowering.arch_of_capability) tests them
TARGETS = {"sm90": {"kind": "cuda", "arch": "sm_90a"},
           "sm80": {"kind": "cuda", "arch": "sm_80", "code": ["sm_80", "sm_90"]}}


def _problem_fields(key: KernelKey) -> dict[str, Any]:
    """Every name a template may use for the problem's sizes (templates pick theirs)."""
    p = key.param
    scale = key.scale if key.scale is not None else (key.head_dim or 1) ** -0.5
    fields = dict(heads_q=key.heads, heads_kv=key.kv_heads, head_dim_qk=key.head_dim, head_dim_v=key.v_head_dim,
                  dim_k=key.head_dim, dim_v=key.v_head_dim, scale=float(scale), dtype=key.dtype, **p)
    fields["smem_block"], fields["smem_sm"] = SHARED_MEMORY[key.arch]
    if "sel_block" in p:
        fields["block"] = p["sel_block"]
    part = KINDS[key.kind].part
    if part is not None:  # kinds that share a template family select their kernel with `part`
        fields["part"] = part
    return fields


def template_config(key: KernelKey, schedule: dict[str, Any] | None = None):
    """The template's config object for key (schedule: key.schedule unless given)."""
    module_name, cls_name = KINDS[key.kind].template, KINDS[key.kind].config
    mod = template_module(module_name)
    cls = getattr(mod, cls_name)
    sched = dict(key.schedule or ()) if schedule is None else dict(schedule)
    problem = _problem_fields(key)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(sched) - names)
    if unknown:
        raise ValueError(f"{key}: schedule knobs {unknown} are not fields of {module_name}.{cls_name}")
    kwargs = {n: problem[n] for n in names if n in problem and n not in sched}
    kwargs.update(sched)
    return cls(**kwargs)


def check_schedule(key: KernelKey, schedule: dict[str, Any]) -> str | None:
    """None when the template accepts schedule for key's problem, else the reason it does not."""
    mod = template_module(KINDS[key.kind].template)
    try:
        cfg = template_config(key, schedule)
        mod.check_config(cfg)
    except (ValueError, TypeError) as e:
        return str(e)
    return None


_TEMPLATE_HASHES: dict[tuple, str] = {}
# Shared template modules that only validate (they shape no generated code): left out of hashes.
_VALIDATION_ONLY = {"_problem"}


def _shared_modules(text: str) -> list[str]:
    """The shared template modules (templates/_name.py) a template's text imports (`from ._name import`)."""
    import re
    return sorted(set(re.findall(r"^from \.(_\w+) import", text, re.M)) - _VALIDATION_ONLY)


def template_source_hash(kind: str) -> str:
    """Hash of the template file's text, with the text of the shared modules it imports that shape
    its code (templates/_token_tile.py ...). Read, not imported: checking a prebuilt kernel needs no
    TileLang. Remembered per file version (path, mtime, size): tuning logs ask once per record."""
    from .resources import templates_dir
    root = templates_dir()
    path = root / f"{KINDS[kind].template}.py"
    text = path.read_bytes()
    files = [path] + [root / f"{m}.py" for m in _shared_modules(text.decode())]
    version = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    h = _TEMPLATE_HASHES.get(version)
    if h is None:
        digest = hashlib.sha256(text)
        for f in files[1:]:  # a template without shared modules keeps the hash of its own text
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
        h = _TEMPLATE_HASHES[version] = digest.hexdigest()[:12]
    return h


def build_prim_func(key: KernelKey):
    if key.schedule is None:
        raise ValueError(f"{key}: choose a schedule before building (KernelKey.with_schedule)")
    mod = template_module(KINDS[key.kind].template)
    cfg = template_config(key)
    mod.check_config(cfg)
    pass_configs = mod.pass_configs(cfg) if hasattr(mod, "pass_configs") else None
    return mod.build(cfg), pass_configs


# A branch only one thread of a group enters: TileLang's elected TMA issuer, or thread 0.
_ONE_THREAD_BRANCH = re.compile(r"if \((tl::tl_shuffle_elect<\d+>\(\)|\(\(int\)threadIdx\.x\) == 0)\) \{")
_BARRIER = re.compile(r"__syncthreads\(\)|__sync_thread_partial\(|bar\.sync|barrier\.sync")


def barriers_in_one_thread_branches(source: str) -> list[str]:
    """The lines of `source` (generated CUDA) where a CTA or named barrier sits inside a branch only
    one thread enters. Such a barrier waits for threads that never come: the kernel hangs on the GPU
    (TileLang 0.1.15 emits one when TMA coordinates read shared memory; templates/_token_tile.py)."""
    found = []
    for m in _ONE_THREAD_BRANCH.finditer(source):
        body = source[m.end():_block_end(source, m.end())]
        for b in _BARRIER.finditer(body):
            line = source.count("\n", 0, m.end() + b.start()) + 1
            found.append(f"line {line}: {body[b.start():].splitlines()[0].strip()} inside `{m.group(0)}`")
    return found


# A branch whose condition reads the warp index (threadIdx.x >> 5): whole warps enter or skip it
# (the selection token tile's warp_skip schedule). A CTA / named barrier in it, or a reduction wide
# enough to need one (tl::AllReduce over more than 32 threads syncs through shared memory), waits
# for warps that skipped it.
_WARP_BRANCH = re.compile(r"if \(([^{}\n]*threadIdx\.x\)\)? >> (?:\(int64_t\))?5\)[^{}\n]*)\) \{")
_WIDE_REDUCE = re.compile(r"tl::AllReduce<[^,<>]+, (\d+),")


def barriers_in_warp_branches(source: str) -> list[str]:
    """The lines of `source` (generated CUDA) where a barrier, or a tl::AllReduce over more than one
    warp, sits inside a branch that some warps skip (its condition reads threadIdx.x >> 5): the
    warps inside wait for the others forever."""
    found = []
    for m in _WARP_BRANCH.finditer(source):
        body = source[m.end():_block_end(source, m.end())]
        hits = list(_BARRIER.finditer(body))
        hits += [r for r in _WIDE_REDUCE.finditer(body) if int(r.group(1)) > 32]
        for b in hits:
            line = source.count("\n", 0, m.end() + b.start()) + 1
            found.append(f"line {line}: {body[b.start():].splitlines()[0].strip()[:80]} inside a per-warp branch")
    return found


_SPLIT = re.compile(r"^\s*if \(\(\(int\)threadIdx\.x\) (<|>=) (\d+)\) \{", re.M)
_LET = re.compile(r"^\s*(?:(?:bool|int|int64_t|uint|float) )?(\w+) = ([^;]*);", re.M)


def _block_end(source: str, i: int, pair: str = "{}") -> int:
    """The index just past the closing bracket (pair[1]) that matches the opening one (pair[0])
    ending at i: a `{` block by default, or `(...)`, `[...]`."""
    depth = 1
    while depth and i < len(source):
        depth += {pair[0]: 1, pair[1]: -1}.get(source[i], 0)
        i += 1
    return i


def thread_values_across_warp_split(source: str) -> list[str]:
    """Values computed from threadIdx.x before a warp-specialized split (`if (threadIdx.x < N)`
    producer / `else` consumer) and read inside the branch whose threads start at N. TileLang 0.1.15
    remaps the thread index inside that branch (threadIdx.x - N) but not in a value it hoisted above
    the split, so the two disagree: rows shifted by N / (threads per row), outputs unwritten or
    written to the wrong rows (templates/selection_topn.py's row test did this)."""
    found = []
    for m in _SPLIT.finditer(source):
        before = source[:m.start()]
        tainted: set[str] = set()
        for let in _LET.finditer(before):
            rhs = let.group(2)
            if "threadIdx.x" in rhs or any(re.search(rf"\b{re.escape(t)}\b", rhs) for t in tainted):
                tainted.add(let.group(1))
        then_end = _block_end(source, m.end())
        if m.group(1) == "<":   # the else branch holds threads >= N
            rest = source[then_end:]
            e = re.match(r"\s*else \{", rest)
            if not e:
                continue
            start = then_end + e.end()
            shifted = source[start:_block_end(source, start)]
        else:
            shifted = source[m.end():then_end]
        for name in sorted(tainted):
            if re.search(rf"\b{re.escape(name)}\b", shifted):
                found.append(f"`{name}` (computed from threadIdx.x above `{m.group(0).strip()}`, read by the "
                             f"threads >= {m.group(2)})")
    return found


_WGMMA_EVENT = re.compile(r"warpgroup_commit_batch\(\)|(?:warpgroup_wait|wait_wgmma)<(\d+)>\(\)|"
                          r"mbarrier\[[^\]]+\]\.arrive\(\)")


def stages_freed_under_async_mma(source: str) -> list[str]:
    """The lines of `source` (generated CUDA) where a consumer frees a pipeline stage (a plain
    mbarrier arrive) while a WGMMA batch it committed may still be running: the producer may then
    refill the shared memory that WGMMA is reading. TileLang frees a stage after the last statement
    that reads it, which is the issue of an async `T.wgmma_gemm`, not its completion; the templates
    end each step with a synchronous gemm (a full wait) to prevent that. Scans in program order,
    counting committed batches down at each wait<N>."""
    found, pending = [], 0
    for m in _WGMMA_EVENT.finditer(source):
        text = m.group(0)
        if text.startswith("warpgroup_commit"):
            pending += 1
        elif m.group(1) is not None:
            pending = min(pending, int(m.group(1)))
        elif pending:
            line = source.count("\n", 0, m.start()) + 1
            found.append(f"line {line}: {text} with {pending} WGMMA batch(es) not waited for")
    return found


_SMEM_BASE = re.compile(r"void\* (\w+) = \(\(void\*\)\(\(char\*\)buf_dyn_shmem \+ (\d+)\)\);")
_TMA_DEST = re.compile(r"tl::tma_load\((\w+), [^;]*?\(&\(\(\((\w+)\*\)(\w+)\)\[")
_ELEM_BYTES = {"half_t": 2, "bfloat16_t": 2, "float": 4, "int": 4, "uint": 4, "fp8_e4_t": 1, "fp8_e5_t": 1,
               "signed char": 1, "uint8_t": 1, "double": 8, "int64_t": 8}


def _split_top(expr: str, ops: str) -> list[str]:
    """expr split at the operators in `ops` outside parentheses (the operators are kept in front)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(expr):
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth == 0 and c in ops and i > start:
            parts.append(expr[start:i])
            start = i
    parts.append(expr[start:])
    return [x.strip() for x in parts]


def _strip_parens(expr: str) -> str:
    """expr without the parentheses that enclose all of it."""
    expr = expr.strip()
    while expr.startswith("(") and _block_end(expr, 1, "()") == len(expr):
        expr = expr[1:-1].strip()
    return expr


def _granule(expr: str) -> int:
    """The largest g such that the integer expression (generated CUDA: +, -, * of literals and
    anything else) is always a multiple of g; 0 for the literal 0."""
    import math
    expr = _strip_parens(expr)
    terms = _split_top(expr, "+-")
    if len(terms) > 1:
        g = 0
        for t in terms:
            g = math.gcd(g, _granule(t.lstrip("+-")))
        return g
    factors = _split_top(expr, "*")
    if len(factors) > 1:
        g = 1
        for f in factors:
            g *= _granule(f.lstrip("*"))
        return g
    if re.fullmatch(r"\d+", expr):
        return int(expr)
    return 1   # a variable, a cast, a bit operation: any value


def tma_destinations_misaligned(source: str) -> list[str]:
    """TMA loads (tl::tma_load) in `source` (generated CUDA) whose shared-memory destination is not
    always 128-byte aligned, as the hardware requires (else: a misaligned-address fault): the
    buffer's offset in dynamic shared memory, or any term of the element index (a ring stage's
    stride: a stage of 16 floats is 64 bytes), scaled by the element size."""
    bases = {m.group(1): int(m.group(2)) for m in _SMEM_BASE.finditer(source)}
    bases.setdefault("buf_dyn_shmem", 0)
    found = []
    for m in _TMA_DEST.finditer(source):
        elem, buf = m.group(2), m.group(3)
        index = source[m.end():_block_end(source, m.end(), "[]") - 1]
        size = _ELEM_BYTES.get(elem)
        if size is None or buf not in bases:
            continue   # a static __shared__ array (aligned by its declaration) or an unknown type
        g = _granule(index) * size
        if bases[buf] % 128 or (g and g % 128):
            line = source.count("\n", 0, m.start()) + 1
            found.append(f"line {line}: {m.group(1)} into {buf}[{index}] ({elem}, offset {bases[buf]} bytes)")
    return found


def compile_kernel(key: KernelKey, target: dict | str | None = None):
    """TileLang-compile key's kernel for its arch (or an explicit target). Returns the JITKernel.
    Raises if the generated CUDA would deadlock (barriers_in_one_thread_branches,
    barriers_in_warp_branches), free a pipeline
    stage under a running WGMMA (stages_freed_under_async_mma), TMA into a misaligned shared-memory
    address (tma_destinations_misaligned) or read thread values in the wrong numbering
    (thread_values_across_warp_split)."""
    import tilelang

    func, pass_configs = build_prim_func(key)
    target = target or TARGETS[key.arch]
    try:
        jit = tilelang.compile(func, target=target, pass_configs=pass_configs)
    except Exception as e:
        raise RuntimeError(f"compiling {key} for {target} failed: {type(e).__name__}: {e}") from e
    src = jit.get_kernel_source()
    hangs = barriers_in_one_thread_branches(src)
    if hangs:
        raise RuntimeError(f"compiling {key} for {target}: the generated CUDA would hang, a barrier "
                           f"only one thread reaches: {'; '.join(hangs[:3])}")
    hangs = barriers_in_warp_branches(src)
    if hangs:
        raise RuntimeError(f"compiling {key} for {target}: the generated CUDA would hang, a barrier "
                           f"only some warps reach: {'; '.join(hangs[:3])}")
    early = stages_freed_under_async_mma(src)
    if early:
        raise RuntimeError(f"compiling {key} for {target}: the generated CUDA frees a pipeline stage while an async "
                           f"WGMMA may still read it: {'; '.join(early[:3])}")
    misaligned = tma_destinations_misaligned(src)
    if misaligned:
        raise RuntimeError(f"compiling {key} for {target}: a TMA load's shared-memory destination is not 128-byte "
                           f"aligned (a misaligned-address fault on the GPU): {'; '.join(misaligned[:3])}")
    shifted = thread_values_across_warp_split(src)
    if shifted:
        raise RuntimeError(f"compiling {key} for {target}: the generated CUDA reads thread-index values "
                           f"across a warp-specialized split, in the wrong thread numbering: {'; '.join(shifted[:3])}")
    return jit


def ptxas_report(jit_kernel, arch: str = "sm_90a") -> str:
    """ptxas's verbose report (registers, spills, and its notes such as C7517: a warpgroup.wait it
    injected because registers of an in-flight WGMMA are touched, i.e. async WGMMA serialized) for
    a compiled kernel's CUDA source, recompiled with nvcc for `arch` (CPU only; nvcc needed)."""
    import os
    import subprocess
    import tempfile
    import tilelang
    root = os.path.dirname(tilelang.__file__)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "kernel.cu")
        with open(src, "w") as f:
            f.write(jit_kernel.get_kernel_source())
        num = arch.split("_")[1]
        cmd = ["nvcc", f"-gencode=arch=compute_{num},code={arch}", "-std=c++20", "-O3", "-cubin",
               f"-I{root}/src", f"-I{root}/3rdparty/cutlass/include", "-Xptxas", "-v", src,
               "-o", os.path.join(d, "kernel.cubin")]
        out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"nvcc failed on {jit_kernel.key if hasattr(jit_kernel, 'key') else 'the kernel'}: "
                           f"{out.stderr[-2000:]}")
    return out.stderr


def _nvdisasm() -> str | None:
    import shutil
    found = shutil.which("nvdisasm")
    if found:
        return found
    try:  # the nvidia-cuda-nvdisasm wheel (the test extra) ships the binary
        import importlib.util
        from pathlib import Path
        spec = importlib.util.find_spec("nvidia")
        for root in (spec.submodule_search_locations or []) if spec else []:
            for cand in Path(root).glob("cu*/bin/nvdisasm"):
                return str(cand)
    except ImportError:
        pass
    return None


def embedded_cubins(artifact: str) -> list[bytes]:
    """The device ELF images (cubins) inside a compiled TileLang artifact (.so): one per SASS target
    (sm80 kernels carry sm_80 and sm_90).  Each image's length comes from its own ELF64 header (the
    end of its section / program header tables), whatever wraps it (a length prefix or a fatbin)."""
    import struct
    data = open(artifact, "rb").read()
    out, at = [], data.find(b"\x7fELF", 1)
    while at > 0:
        if at + 64 <= len(data) and data[at + 4] == 2 and data[at + 18] == 0xBE:  # ELF64, EM_CUDA
            phoff, shoff = struct.unpack_from("<QQ", data, at + 0x20)
            phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, at + 0x36)
            size = max(shoff + shentsize * shnum, phoff + phentsize * phnum)
            if 64 <= size <= len(data) - at:
                out.append(data[at:at + size])
        at = data.find(b"\x7fELF", at + 1)
    return out


def disassemble(jit_kernel) -> str:
    """SASS of a compiled kernel (its artifact in the TileLang cache), via nvdisasm."""
    import glob
    import os
    import subprocess
    import tempfile
    tool = _nvdisasm()
    if tool is None:
        raise FileNotFoundError("nvdisasm not found (install nvidia-cuda-nvdisasm or the CUDA toolkit)")
    entry = getattr(jit_kernel, "_tilelang_cache_path", None)
    libs = sorted(glob.glob(os.path.join(entry, "*.so"))) if entry else []
    if not libs:
        raise FileNotFoundError("the kernel has no compiled artifact on disk (TileLang cache disabled?)")
    sass = []
    for cubin in embedded_cubins(libs[0]):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            sass.append(subprocess.run([tool, f.name], capture_output=True, text=True, check=True).stdout)
    return "\n".join(sass)
