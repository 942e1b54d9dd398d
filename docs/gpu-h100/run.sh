set -u
export PYTHONUNBUFFERED=1 BN_COMPARE_ALLOW_MISSING=mxnet BN_COMPARE_SAMPLE_DIR=$PWD/.device/sample
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/env.txt
python3 -c "import sys,torch,jax,flax,optax,numpy;print(sys.version.split()[0],'torch',torch.__version__,'jax',jax.__version__,'flax',flax.__version__,'optax',optax.__version__,'numpy',numpy.__version__, jax.devices())" | tee -a $OUT/env.txt
timeout 330 python3 compare.py --quick --device gpu --data .device/sample --out $OUT/gpu > $OUT/compare.log 2>&1; echo "compare rc=$?" | tee -a $OUT/compare.log
grep -E "^\| (torch|jax|mxnet)|rc=|checks that failed|^  " $OUT/compare.log | tail -60
timeout 200 python3 -m pytest -q -p no:cacheprovider tests -k "not quick_run" -x > $OUT/pytest.log 2>&1; echo "pytest rc=$?"
tail -15 $OUT/pytest.log
