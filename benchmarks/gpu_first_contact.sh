#!/usr/bin/env bash
# The first run on a GPU machine that has torch but not this package's pure-Python dependencies and
# no network: doctor's checks, then benchmarks/gpu.py within a budget, every output kept.
#
#   bash benchmarks/gpu_first_contact.sh prepare        # here, with a package index: wheels into .whl/
#   OUT=/some/dir bash benchmarks/gpu_first_contact.sh run [BUDGET_S]   # there (default budget 240 s)
#
# `run` installs the wheels in .whl/ (if any) into a private folder, runs the package from this
# checkout, and writes into $OUT: env.txt (nvidia-smi, torch, CUDA), doctor.json and doctor.log
# (`medi-fast doctor --check`), gpu.json and gpu.log (benchmarks/gpu.py).  The whole run takes about
# BUDGET_S + 150 s; each part has its own timeout, and a part that fails does not stop the next.
set -u
cd "$(dirname "$0")/.."
# Pure-Python packages a bare CUDA image with torch tends to lack (the rest of install_requires is
# usually there: pandas, scipy, onnx, onnxruntime, click, ...).  Pinned to what CI tests with.
WHEELS=("diffusers==0.42.1" "importlib_metadata==10.2.0")

case "${1:-}" in
  prepare)
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "${WHEELS[@]}"
    ls -l .whl
    ;;
  run)
    budget="${2:-240}"
    out="${OUT:-$PWD/gpu_out}"
    mkdir -p "$out"
    site=/tmp/medi-fast-site
    if compgen -G ".whl/*.whl" > /dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "installing .whl/ failed" | tee "$out/env.txt"; exit 3; }
    fi
    # training/ and engines/ install as medi_fast.training / medi_fast.engines (setup.cfg package_dir);
    # run from the checkout without installing: the same mapping as links.
    [ -e medi_fast/training ] || ln -s ../training medi_fast/training
    [ -e medi_fast/engines ] || ln -s ../engines medi_fast/engines
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    { nvidia-smi; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"; } \
      > "$out/env.txt" 2>&1
    # The README's first lines, as a user runs them (defaults untouched), in a scratch folder.
    ( work=$(mktemp -d) && cd "$work" && set -x \
      && time python3 -m medi_fast.cli init-checkpoint --preset tiny-32 --classes LUAD,LUSC --tss 05,44,49 --out ckpt.pt \
      && time timeout 120 python3 -m medi_fast.cli export ckpt.pt \
      && ls -l ckpt.export && cat ckpt.export/*.json \
      ; time timeout 60 python3 -m medi_fast.cli generate --class LUAD --tss 05 --n 10000 \
      ; time timeout 60 python3 -m medi_fast.cli generate ckpt.pt --class LUAD --tss 05 --n 10000 --out synth-ckpt \
      ; find synth synth-ckpt -name '*.png' | wc -l ) > "$out/user.log" 2>&1 &
    user_pid=$!
    timeout 150 python3 -m medi_fast.cli doctor --check --json "$out/doctor.json" > "$out/doctor.log" 2>&1
    echo "doctor exit $?"
    wait "$user_pid"; echo "user commands exit $?"; tail -n 25 "$out/user.log"
    timeout $((${budget%.*} + 120)) python3 benchmarks/gpu.py --budget-s "$budget" --json "$out/gpu.json" > "$out/gpu.log" 2>&1
    echo "gpu.py exit $?"
    tail -n 40 "$out/gpu.log"
    ;;
  *)
    echo "usage: $0 prepare | run [BUDGET_S]" >&2
    exit 2
    ;;
esac
