"""Which deliberate breakage each host test's comparison with the plain run catches (RESULTS.md, "Checks and
the breakage each catches"). For one breakage: edit the counted file in the working tree, run the host's
hybrid-against-plain test (the new check) under pytest, evaluate the check it replaced on the same runs' logs,
and restore the file (even on failure). Not a test; run from the repo root:

    python3 tests/breakages.py BREAK HOST [HOST ...]     # BREAK in BREAKS (none: unbroken), HOST in TESTS
    python3 tests/breakages.py parse /tmp/breakages/BREAK_HOST ...   # the numbers of runs already made

Prints, per host: old passed/FAILED, new passed/FAILED, and the numbers (hybrid against plain)."""
import glob
import math
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tools"), str(REPO / "tests")]  # what pytest's pythonpath gives conftest
from conftest import grab  # noqa: E402

# the dynamics' state-dict entries rounded to an int8 grid (one scale per tensor) wherever the model is saved
HOOK = ("        self.D = nn.Parameter(torch.ones(heads))\n",
        "        self.D = nn.Parameter(torch.ones(heads))\n"
        "        self._register_state_dict_hook(lambda m, sd, p, meta: [sd.__setitem__(k, (t / (s := t.abs().max().clamp_min(1e-12) / 127)).round() * s) for k, t in list(sd.items()) if k.startswith(p)].clear())\n")
# name -> (file, text, its broken replacement); every text must occur once in the file
BREAKS = {
    "none": None,
    "leak": ("hymba_layer.py", "shifted = F.pad(u, (0, 0, j, 0))[:, :T]", "shifted = F.pad(u, (0, 0, 0, j))[:, j:]"),
    "sign": ("hymba_layer.py", "log_a = -dt * self.A_log.exp()", "log_a = dt * self.A_log.exp()"),
    "zero": ("hymba_layer.py", "return F.rms_norm(y + self.D.to(y.dtype)[:, None] * v_heads, (d,))", "return 0 * F.rms_norm(y + self.D.to(y.dtype)[:, None] * v_heads, (d,))"),
    "nonorm": ("hymba_layer.py", "return F.rms_norm(y + self.D.to(y.dtype)[:, None] * v_heads, (d,))", "return y + self.D.to(y.dtype)[:, None] * v_heads"),
    "noD": ("hymba_layer.py", "return F.rms_norm(y + self.D.to(y.dtype)[:, None] * v_heads, (d,))", "return F.rms_norm(y, (d,))"),
    "int8dyn": ("hymba_layer.py", *HOOK),
    "routing": ("hymba_layer.py", "if isinstance(value, (tuple, list)) and not all(p in value for p in CONTROL_PATTERNS):", "if False:"),
    "scale10": ("hymba_layer.py", "return F.rms_norm(y + self.D.to(y.dtype)[:, None] * v_heads, (d,))", "return 10 * F.rms_norm(y + self.D.to(y.dtype)[:, None] * v_heads, (d,))"),
    "int4dyn": ("hymba_layer.py", HOOK[0], HOOK[1].replace("/ 127", "/ 7")),
    "reset": ("hymba_layer.py", HOOK[0], HOOK[0] + "        self._register_load_state_dict_pre_hook(lambda sd, p, *a: sd.update({p + 'D': torch.ones_like(sd[p + 'D']), p + 'dt_weight': torch.zeros_like(sd[p + 'dt_weight'])}))\n"),
    "int4": ("train_gpt.py", "scale = (clip / 127).clamp_min(1 / 127)", "scale = (clip / 7).clamp_min(1 / 127)"),
    "int5": ("train_gpt.py", "scale = (clip / 127).clamp_min(1 / 127)", "scale = (clip / 15).clamp_min(1 / 127)"),
    "D0": ("hymba_layer.py", HOOK[0], HOOK[0] + "        self._register_load_state_dict_pre_hook(lambda sd, p, *a: sd.update({p + 'D': torch.zeros_like(sd[p + 'D'])}))\n"),
    "scale100": ("hymba_layer.py", "return F.rms_norm(y + self.D.to(y.dtype)[:, None] * v_heads, (d,))", "return 100 * F.rms_norm(y + self.D.to(y.dtype)[:, None] * v_heads, (d,))"),
    "convreset": ("hymba_layer.py", HOOK[0], HOOK[0] + "        self._register_load_state_dict_pre_hook(lambda sd, p, *a: sd.update({p + 'conv_weight': F.pad(torch.ones_like(sd[p + 'conv_weight'][:, :1]), (0, sd[p + 'conv_weight'].size(1) - 1))}))\n"),
    "int6": ("train_gpt.py", "scale = (clip / 127).clamp_min(1 / 127)", "scale = (clip / 31).clamp_min(1 / 127)"),
    "int7": ("train_gpt.py", "scale = (clip / 127).clamp_min(1 / 127)", "scale = (clip / 63).clamp_min(1 / 127)"),
}
TESTS = {  # host -> the new check
    "root": "tests/test_host_root.py::test_hybrid_run_learns_like_the_plain_run_and_finishes_with_its_roundtrip_score",
    "record": "tests/test_host_record.py::test_hybrid_record_trains_exports_and_scores_like_the_plain_record",
    "pr1493": "tests/test_host_pr1493.py::test_hybrid_learns_and_scores_like_the_plain_script",
    "smoke": "tests/test_train_smoke.py::test_roundtrip_val_loss_and_bpb_are_within_0_0005_of_the_last_pre_export_values",
}


def read(base, pattern):
    [path] = [p for p in glob.glob(f"{base}/{pattern}") if "current" not in p]
    return Path(path).read_text()


def old_check(host, base):
    """(old check passed?, the numbers) from the runs' logs."""
    if host == "root":
        h, p = read(base, "hybrid*/logs/run.txt"), read(base, "original*/logs/run.txt")
        lh, lp = (dict(grab(r"^step:(\d+)/8 train_loss:{n} ", t)) for t in (h, p))
        [(pre,)] = grab(r"^step:8/8 val_loss:[\d.]+ val_bpb:{n} ", h)
        [(bpb,)] = grab(r"^final_int8_zlib_roundtrip_exact val_loss:[\d.]+ val_bpb:{n}$", h)
        [(pbpb,)] = grab(r"^final_int8_zlib_roundtrip_exact val_loss:[\d.]+ val_bpb:{n}$", p)
        ok = lh[8] < lh[1] - 0.5 and abs(bpb - pre) < 0.02
        return ok, dict(drop_h=lh[1] - lh[8], drop_p=lp[1] - lp[8], ratio=(lh[1] - lh[8]) / (lp[1] - lp[8]), bpb_h=bpb, bpb_p=pbpb, diff=bpb - pbpb, gap=bpb - pre)
    if host == "record":
        h, p = read(base, "record_hybrid*/logs/*.txt"), read(base, "record[0-9]*/logs/*.txt")
        lh, lp = ({int(s): l for s, l in grab(r"^(\d+)/8 train_loss: {n} ", t)} for t in (h, p))
        sc = lambda t: {l: float(b) for l, b in re.findall(r"^(.+?) val_loss:[-\w.]+ val_bpb:([-\w.]+) eval_time:\d+ms$", t, re.M)}
        sh, sp = sc(h), sc(p)
        labels = ("diagnostic pre-quantization post-ema", "diagnostic quantized", "quantized_ttt_phased")
        ok = lh[8] < lh[1] - 1.0 and all(math.isfinite(sh[l]) and 0 < sh[l] < 4 for l in labels)
        return ok, dict(drop_h=lh[1] - lh[8], drop_p=lp[1] - lp[8], ratio=(lh[1] - lh[8]) / (lp[1] - lp[8]), **{l: (sh[l], sp[l], round(sh[l] - sp[l], 5)) for l in labels})
    if host == "pr1493":
        h, p = read(base, "hybrid*/logs/run.txt"), read(base, "plain*/logs/run.txt")
        lh, lp = ({int(s): l for s, l in grab(r"^(\d+)/6 train_loss: {n} ", t)} for t in (h, p))
        sc = lambda t: {l: float(b) for l, b in re.findall(r"^(.+?) val_loss:[\d.naif]+ val_bpb:([\d.naif]+) eval_time:", t, re.M)}
        sh, sp = sc(h), sc(p)
        labels = ("pre-quantization post-ema", "quantized", "quantized_sliding_window", "quantized_ttt")
        ok = all(0 < sh[l] < 8 for l in labels)
        return ok, dict(drop_h=lh[1] - lh[6], drop_p=lp[1] - lp[6], ratio=(lh[1] - lh[6]) / (lp[1] - lp[6]), **{l: (sh[l], sp[l], round(sh[l] - sp[l], 5)) for l in labels})
    t = read(base, "smoke*/logs/smoke.txt")
    [(pl, pb)] = grab(r"^step:40/40 val_loss:{n} val_bpb:{n} ", t)
    [(el, eb)] = grab(r"^final_int8_zlib_roundtrip_exact val_loss:{n} val_bpb:{n}$", t)
    return abs(eb - pb) < 0.02 and abs(el - pl) < 0.03, dict(gap_bpb=eb - pb, gap_loss=el - pl)


def main(name, hosts):
    brk = BREAKS[name]
    path = REPO / brk[0] if brk else None
    if brk:
        text = path.read_text()
        assert text.count(brk[1]) == 1, f"{name}: {brk[1]!r} not found once in {brk[0]}"
        path.write_text(text.replace(brk[1], brk[2]))
    try:
        for host in hosts:
            base = f"/tmp/breakages/{name}_{host}"
            subprocess.run(["rm", "-rf", base])
            t0 = time.time()
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", TESTS[host], f"--basetemp={base}"], cwd=REPO, capture_output=True, text=True)
            new_ok = proc.returncode == 0
            try:
                old_ok, numbers = old_check(host, base)
            except Exception as e:
                old_ok, numbers = None, f"logs unreadable: {e!r}"
            tail = "" if new_ok else proc.stdout.strip().splitlines()[-1][:300]
            print(f"BREAK {name} HOST {host}: old {'passed' if old_ok else 'FAILED' if old_ok is False else '?'} / new {'passed' if new_ok else 'FAILED'} ({time.time() - t0:.0f}s) {numbers} {tail}", flush=True)
    finally:
        if brk:
            text = path.read_text()
            assert text.count(brk[2]) == 1, f"{name}: cannot restore {brk[0]}"
            path.write_text(text.replace(brk[2], brk[1]))


if __name__ == "__main__":
    if sys.argv[1] == "parse":
        for base in sys.argv[2:]:
            print(base, old_check(base.split("_")[-1], base))
    else:
        main(sys.argv[1], sys.argv[2:])
