"""nano-vLLM's throughput workload on the real engine, against transformers and the roofline (issue 3).

The benchmark lives in twinfer/throughput_benchmark.py so that `twinfer bench throughput` runs it too.

    python benchmarks/throughput.py [--model qwen3-0.6b] [--num-seqs 256] [--out result.json]
"""

from twinfer.throughput_benchmark import main

if __name__ == "__main__":
    main()
