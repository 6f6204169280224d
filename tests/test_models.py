"""twinfer's models against transformers on tiny random checkpoints (CPU, float32): same greedy tokens."""

import json

import pytest
import torch

from engine.clock import VirtualClock
from engine.config import EngineConfig
from engine.engine import Engine
from engine.loader import save_dummy_checkpoint
from engine.model_config import load_model_config, model_config_from_dict
from engine.model_executor import ModelExecutor
from engine.models import attention_features
from engine.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")

VOCAB = 256
NEW_TOKENS = 32
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def _make_model(arch: str):
    if arch == "qwen3":  # tied embeddings
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY, tie_word_embeddings=True))
    if arch == "qwen2":  # untied, q/k/v biases
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, tie_word_embeddings=False))
    # Llama-3 rope scaling with a short original context, so the scaled band covers real positions.
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE)
    return transformers.LlamaForCausalLM(config)


def _prompts() -> list[list[int]]:
    """Mixed lengths; three share a 40-token prefix (more than two full blocks) so the prefix cache can hit."""
    prefix = [(13 * j + 5) % VOCAB for j in range(40)]
    shared = [prefix + [(31 * i + 7 * j) % VOCAB for j in range(n)] for i, n in enumerate((3, 11, 20))]
    others = [[(7 * i + 11 * j + 1) % VOCAB for j in range(n)] for i, n in enumerate((1, 5, 17, 33))]
    return [shared[0], *others[:2], shared[1], others[2], shared[2], others[3]]


@pytest.fixture(scope="module", params=["qwen3", "qwen2", "llama"])
def checkpoint(request, tmp_path_factory):
    """(folder, transformers greedy completions) of one tiny random model saved as safetensors."""
    torch.manual_seed({"qwen3": 0, "qwen2": 1, "llama": 2}[request.param])
    model = _make_model(request.param).eval()
    with torch.no_grad():
        # Larger weights than the default init make the argmax decisive, so float32 summation order cannot flip it.
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
            else:
                param.normal_(1.0 if "norm" in name else 0.0, 0.1)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    expected = []
    with torch.no_grad():
        for prompt in _prompts():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False)
            expected.append(out[0, len(prompt):].tolist())
    return str(folder), expected


def _run_twinfer(folder: str, device: str = "cpu", backend: str = "torch", mixed_cuda_graphs: bool | None = False,
                 **config):
    engine_config = EngineConfig(max_model_len=256, vocab_size=VOCAB, **config)
    executor = ModelExecutor(folder, engine_config, device=device, attention_backend=backend, dtype="float32",
                             mixed_cuda_graphs=mixed_cuda_graphs)
    engine = Engine(engine_config, executor, clock=VirtualClock())
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    # The first prompt arrives alone so later prompts sharing its prefix can hit the cache.
    ids = [engine.add_request(prompt_token_ids=prompt, sampling_params=params, arrival_time=0.0 if i == 0 else 1e-6)
           for i, prompt in enumerate(_prompts())]
    engine.run()
    return [engine.output_token_ids(rid) for rid in ids], engine


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_matches_transformers_with_prefix_caching(checkpoint, async_scheduling):
    folder, expected = checkpoint
    outputs, engine = _run_twinfer(folder, enable_prefix_caching=True, async_scheduling=async_scheduling)
    assert outputs == expected
    assert sum(step.prefix_cache_hit_tokens for step in engine.step_records) > 0


def test_greedy_matches_transformers_without_prefix_caching(checkpoint):
    folder, expected = checkpoint
    outputs, engine = _run_twinfer(folder, enable_prefix_caching=False)
    assert outputs == expected
    assert sum(step.prefix_cache_hit_tokens for step in engine.step_records) == 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_matches_transformers_with_tiny_prefill_chunks(checkpoint, async_scheduling):
    folder, expected = checkpoint
    outputs, engine = _run_twinfer(folder, max_num_batched_tokens=7, async_scheduling=async_scheduling)
    assert outputs == expected
    assert all(step.num_batched_tokens <= 7 for step in engine.step_records)
    assert any(step.num_prefill_seqs and step.num_decode_seqs for step in engine.step_records)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_matches_transformers_under_preemption(checkpoint, async_scheduling):
    folder, expected = checkpoint
    # 8 blocks of 16 tokens: 128 slots for prompts of up to 73 tokens plus 32 outputs each.
    outputs, engine = _run_twinfer(folder, num_kv_blocks=8, max_num_batched_tokens=64,
                                   async_scheduling=async_scheduling)
    assert outputs == expected
    assert sum(record.num_preemptions for record in engine.request_records.values()) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("mixed_cuda_graphs", [False, True, None])
def test_greedy_matches_transformers_on_cuda_with_triton_and_cuda_graphs(checkpoint, async_scheduling,
                                                                         mixed_cuda_graphs):
    """None: the default, mixed-step graphs on at TP 1 with the triton backend."""
    folder, expected = checkpoint
    outputs, engine = _run_twinfer(folder, device="cuda", backend="triton", max_num_batched_tokens=16, max_num_seqs=8,
                                   async_scheduling=async_scheduling, mixed_cuda_graphs=mixed_cuda_graphs)
    graphs_expected = mixed_cuda_graphs is not False
    assert outputs == expected
    assert engine.executor.mixed_cuda_graphs is graphs_expected
    assert any(step.cuda_graph_batch_size for step in engine.step_records)
    with_prompt_chunks = [step for step in engine.step_records if step.num_prefill_seqs]
    assert all(bool(step.cuda_graph_batch_size) == graphs_expected for step in with_prompt_chunks)


def test_mixed_step_inputs_padded_for_a_cuda_graph(checkpoint):
    """The host side of MixedStepGraphs (checked here on the CPU; the graphs themselves need CUDA): one-token
    rows first, tokens padded with slot -1, sequence rows padded with context 0, and a tile map listing each
    prompt chunk's query tiles once."""
    from engine.cuda_graphs import MixedStepGraphs
    from engine.graph_dispatch import GraphDispatch
    from engine.scheduler_output import ScheduledSequence, SchedulerOutput

    folder, _ = checkpoint
    executor = ModelExecutor(folder, EngineConfig(max_model_len=256, vocab_size=VOCAB, num_kv_blocks=32),
                             device="cpu", dtype="float32")
    runner = executor.runner
    runner.mixed_graphs = MixedStepGraphs(runner.model, (16, 64), max_seqs=6, max_blocks_per_seq=16, block_q=8,
                                          device=torch.device("cpu"))
    runner.dispatch = GraphDispatch(mixed_sizes=(16, 64), max_mixed_seqs=6)
    greedy = SamplingParams(temperature=0)
    chunk = ScheduledSequence(0, list(range(20)), 5, [0, 1], False, True, 0, greedy)
    decode_a = ScheduledSequence(1, [7], 16, [2, 3], True, True, 1, greedy)
    decode_b = ScheduledSequence(2, [9], 3, [4], True, True, 1, greedy)
    step = runner.prepare(SchedulerOutput(0, [chunk, decode_a, decode_b]))
    ids, positions, metadata = step.input_ids, step.positions, step.metadata
    assert step.decode_graph_size == 0 and step.mixed_graph_size == 64
    assert ids[:2].tolist() == [7, 9] and ids[2:22].tolist() == list(range(20)) and not ids[22:].any()
    assert positions[:2].tolist() == [16, 3] and positions[2:22].tolist() == list(range(5, 25))
    assert (metadata.slot_mapping[22:] == -1).all() and metadata.slot_mapping[0] == 3 * 16
    assert metadata.seq_lens.tolist() == [17, 4, 25, 0, 0, 0]
    assert metadata.decode_seq_lens.tolist() == [17, 4, 0, 0, 0, 0]
    work_map, starts, partition_size = metadata.decode_work  # one 512-token partition for each one-token row
    assert work_map.shape == (2, runner.mixed_graphs.work_capacity(64)) and partition_size.tolist() == [512]
    assert work_map[0, :3].tolist() == [0, 1, -1] and work_map[1, :2].tolist() == [0, 0] and starts[:2].tolist() == [0, 1]
    assert metadata.cu_seqlens_q.tolist() == [0, 1, 2, 22, 22, 22, 22]
    tile_seqs, tile_indices = metadata.tile_map
    assert tile_seqs.shape[0] == 64 // 8 + 6
    assert tile_seqs[:3].tolist() == [2, 2, 2] and sorted(tile_indices[:3].tolist()) == [0, 1, 2]
    assert (tile_seqs[3:] == -1).all()
    assert step.sampled_ids == [1, 2, 0] and step.logit_rows.tolist() == [0, 1, 21]
    # Profiling times such a step eagerly too: inside eager_prompt_steps() it takes the eager layout, after it
    # the graphs again.
    graphs = runner.mixed_graphs
    with executor.eager_prompt_steps():
        step = runner.prepare(SchedulerOutput(1, [chunk, decode_a, decode_b]))
        assert step.decode_graph_size == 0 and step.mixed_graph_size == 0
    assert runner.mixed_graphs is graphs


def test_decode_inputs_padded_for_a_cuda_graph(checkpoint):
    """The host side of DecodeGraphs (checked on the CPU; the graphs need CUDA): a step of one-token rows, a
    one-token prompt chunk among them too, padded to the next captured batch size with rows that write no KV
    (slot -1) and attend to nothing (context 0)."""
    from engine.graph_dispatch import GraphDispatch
    from engine.scheduler_output import ScheduledSequence, SchedulerOutput

    folder, _ = checkpoint
    executor = ModelExecutor(folder, EngineConfig(max_model_len=256, vocab_size=VOCAB, num_kv_blocks=32),
                             device="cpu", dtype="float32")
    runner = executor.runner
    runner.dispatch = GraphDispatch(decode_sizes=(1, 2, 4, 8))
    greedy = SamplingParams(temperature=0)
    decode_a = ScheduledSequence(1, [7], 16, [2, 3], True, True, 1, greedy)
    last_chunk = ScheduledSequence(2, [9], 3, [4], False, True, 0, greedy)
    decode_b = ScheduledSequence(3, [5], 20, [5, 6], True, True, 1, greedy)
    step = runner.prepare(SchedulerOutput(0, [decode_a, last_chunk, decode_b]))
    assert step.decode_graph_size == 4 and step.mixed_graph_size == 0
    assert step.input_ids.tolist() == [7, 9, 5, 0] and step.positions.tolist() == [16, 3, 20, 0]
    assert step.metadata.slot_mapping.tolist() == [3 * 16, 4 * 16 + 3, 6 * 16 + 4, -1]
    assert step.metadata.seq_lens.tolist() == [17, 4, 21, 0] and step.metadata.cu_seqlens_q is None
    assert step.metadata.block_tables.tolist() == [[2, 3], [4, 0], [5, 6], [0, 0]]
    assert step.sampled_ids == [1, 2, 3] and step.logit_rows.tolist() == [0, 1, 2]



class _ReplayByRerun:
    """A stand-in for a captured CUDA graph on the CPU: replay reruns the captured forward on the static
    buffers and writes the graph's output tensor, which is what a real replay amounts to."""

    def __init__(self, graphs, num_tokens: int) -> None:
        self.graphs, self.num_tokens = graphs, num_tokens

    def replay(self) -> None:
        self.graphs.outputs[self.num_tokens].copy_(self.graphs._run(self.num_tokens))


def test_mixed_step_graphs_over_an_engine_run_match_transformers(checkpoint):
    """The graph path of steps with prompt chunks end to end on the CPU: Triton kernels (interpreted) in the
    fixed layout, static buffers reused by batches of every shape (fewer sequences than max_seqs, padding
    tokens, PENDING_TOKEN inputs), graph replays emulated; the greedy tokens stay transformers'."""
    from engine.attention import load_backend
    from engine.cuda_graphs import MixedStepGraphs
    from engine.graph_dispatch import GraphDispatch, mixed_step_token_sizes
    from engine.kernels.prefill_attention import prefill_query_tile

    folder, expected = checkpoint
    if not folder.rstrip("/").split("/")[-1].startswith("qwen3"):
        pytest.skip("one architecture is enough: the fixed layout does not depend on it")
    if torch.cuda.is_available():
        pytest.skip("interpreted Triton on CPU tensors; on CUDA the greedy test with mixed-step graphs runs them")
    engine_config = EngineConfig(max_model_len=256, vocab_size=VOCAB, max_num_batched_tokens=24, max_num_seqs=20,
                                 async_scheduling=True)
    executor = ModelExecutor(folder, engine_config, device="cpu", attention_backend="torch", dtype="float32")
    runner = executor.runner
    triton_backend = load_backend("triton")
    for attention in runner.model.attention_layers():
        attention.backend = triton_backend
    attention = runner.model.attention_layers()[0]
    block_q = prefill_query_tile(attention.num_heads, attention.num_kv_heads, attention.head_dim)
    # No floor on the work maps' capacity: the graphs' maps are then column slices of different widths of one
    # buffer, as on a GPU for graphs above 512 tokens when max_num_seqs is above 512.
    graphs = MixedStepGraphs(runner.model, mixed_step_token_sizes(24), engine_config.max_num_seqs,
                             runner.max_blocks_per_seq, block_q, torch.device("cpu"), min_work_capacity=1)
    assert len({graphs.work_capacity(size) for size in graphs.token_sizes}) > 1
    for num_tokens in graphs.token_sizes:
        graphs.outputs[num_tokens] = torch.full((num_tokens, TINY["hidden_size"]), float("nan"))
        graphs.graphs[num_tokens] = _ReplayByRerun(graphs, num_tokens)
    runner.mixed_graphs = graphs
    runner.dispatch = GraphDispatch(mixed_sizes=graphs.token_sizes, max_mixed_seqs=graphs.max_seqs)
    engine = Engine(engine_config, executor, clock=VirtualClock())
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ids = [engine.add_request(prompt_token_ids=prompt, sampling_params=params, arrival_time=0.0 if i == 0 else 1e-6)
           for i, prompt in enumerate(_prompts())]
    engine.run()
    assert [engine.output_token_ids(rid) for rid in ids] == expected
    graph_steps = [step for step in engine.step_records if step.num_prefill_seqs and step.cuda_graph_batch_size]
    assert any(step.num_decode_seqs for step in graph_steps)
    assert all(step.cuda_graph_batch_size in graphs.token_sizes for step in graph_steps)

def test_last_token_logits_match_transformers(checkpoint):
    """One prefill step's logits, checked directly (not only their argmax)."""
    from engine.scheduler_output import ScheduledSequence, SchedulerOutput

    folder, _ = checkpoint
    engine_config = EngineConfig(max_model_len=256, vocab_size=VOCAB, num_kv_blocks=16)
    executor = ModelExecutor(folder, engine_config, device="cpu")
    prompt = _prompts()[4]
    seq = ScheduledSequence(0, prompt, 0, list(range(-(-len(prompt) // 16))), False, True, 0,
                            SamplingParams(temperature=0))
    runner = executor.runner
    step = runner.prepare(SchedulerOutput(0, [seq]))
    with torch.no_grad():
        ours = runner.model.compute_logits(runner.hidden_states(step)[step.logit_rows])[0]
        reference_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        theirs = reference_model(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_dummy_weights_equal_their_saved_checkpoint(tmp_path):
    """load_format=dummy and the safetensors file written from the same dummy weights give the same model."""
    raw = {"architectures": ["Qwen2ForCausalLM"], **TINY, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = load_model_config(str(tmp_path))
    qkv_bias, qk_norm = attention_features(config.architecture, config.attention_bias)
    save_dummy_checkpoint(config, tmp_path, qkv_bias=qkv_bias, qk_norm=qk_norm, seed=7, dtype=torch.float32)
    engine_config = EngineConfig(max_model_len=128, vocab_size=VOCAB, num_kv_blocks=8)
    dummy = ModelExecutor(str(tmp_path), engine_config, device="cpu", load_format="dummy", seed=7)
    loaded = ModelExecutor(str(tmp_path), engine_config, device="cpu", load_format="safetensors", seed=7)
    for (name, a), (_, b) in zip(dummy.runner.model.named_parameters(), loaded.runner.model.named_parameters()):
        assert torch.equal(a, b), name


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], **TINY}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: Qwen3ForCausalLM"):
        load_model_config(str(tmp_path))


def test_missing_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **TINY}))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        ModelExecutor(str(tmp_path), EngineConfig(max_model_len=64, num_kv_blocks=4), device="cpu")


def test_bad_config_field_names_the_file():
    with pytest.raises(ValueError, match="my/config.json.*num_key_value_heads"):
        model_config_from_dict({"architectures": ["LlamaForCausalLM"], **TINY, "num_key_value_heads": 3},
                               source="my/config.json")


@pytest.mark.parametrize("preset, params_billion", [("qwen3-0.6b", 0.60), ("qwen3-8b", 8.19), ("llama-3-8b", 8.03),
                                                    ("qwen3-32b", 32.8)])
def test_presets_have_the_published_sizes(preset, params_billion):
    config = load_model_config(preset)
    assert config.num_params / 1e9 == pytest.approx(params_billion, rel=0.01)


def _tensor_parallel_logits(rank: int, world_size: int, port: int, folder: str, prompt: list[int], results) -> None:
    """One rank of a CPU (gloo) tensor-parallel group: last-token logits of one prefill."""
    import torch.distributed as dist

    from engine.model_runner import ModelRunner
    from engine.scheduler_output import ScheduledSequence, SchedulerOutput

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        runner = ModelRunner(folder, EngineConfig(max_model_len=256, vocab_size=VOCAB, num_kv_blocks=16),
                             device="cpu", dtype="float32")
        seq = ScheduledSequence(0, prompt, 0, list(range(-(-len(prompt) // 16))), False, True, 0,
                                SamplingParams(temperature=0))
        step = runner.prepare(SchedulerOutput(0, [seq]))
        with torch.no_grad():
            logits = runner.model.compute_logits(runner.hidden_states(step)[step.logit_rows])[0]
        if rank == 0:
            results.put(logits.numpy())
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_ranks_reproduce_the_whole_model(checkpoint):
    """Column/row-parallel linears, sharded qkv/gate_up loading and the vocab-parallel head, over gloo."""
    import socket

    import torch.multiprocessing as mp

    from engine.model_runner import ModelRunner
    from engine.scheduler_output import ScheduledSequence, SchedulerOutput

    folder, _ = checkpoint
    prompt = _prompts()[3]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    processes = [context.Process(target=_tensor_parallel_logits, args=(rank, 2, port, folder, prompt, results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    sharded = torch.from_numpy(results.get())
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    runner = ModelRunner(folder, EngineConfig(max_model_len=256, vocab_size=VOCAB, num_kv_blocks=16), device="cpu")
    seq = ScheduledSequence(0, prompt, 0, list(range(-(-len(prompt) // 16))), False, True, 0, SamplingParams(temperature=0))
    step = runner.prepare(SchedulerOutput(0, [seq]))
    with torch.no_grad():
        whole = runner.model.compute_logits(runner.hidden_states(step)[step.logit_rows])[0]
    torch.testing.assert_close(sharded, whole, rtol=1e-4, atol=1e-4)
