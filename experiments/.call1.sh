export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
python -m pytest -m gpu -q -x tests/test_quantized_matmul.py -k "int4 or asm" 2>&1 | tail -15
python experiments/tune_qmatmul.py --formats int4_g128_sym --ms 1,8,32,128,512 --shapes gate_up,down,qkv,o --budget_s 230 --out $OUT/quantized_matmul.json > $OUT/tune_int4_asm.log 2>&1
grep -v "^$" $OUT/tune_int4_asm.log | awk '{print $1,$2,$3,$4,$0}' | cut -c1-40,80-400 | tail -n 120
cp $OUT/quantized_matmul.json kernels_pallas/tuned/quantized_matmul.json
python experiments/bench_qmatmul.py --formats int4_g128_sym --extra_formats int4_g128_asym,int4_g64_sym --budget_s 140 --out $OUT --merge_into experiments/results/qmatmul_h100.json 2>&1 | grep -E "\[|FAILED|summary|int4" | head -60
