"""prepare_sample: a batch without sampling extras builds exactly the arrays it always has (the fast path), and
each extra appears only with a row that asks for it."""

import dataclasses

import numpy as np
import torch

from engine.sampling_params import SamplingParams
from engine.scheduler_output import ScheduledSequence
from engine.step_inputs import SampleArrays, prepare_sample


def _decodes(params_list):
    return [ScheduledSequence(seq_id, [3], 5, [0], True, True, 2, params) for seq_id, params in enumerate(params_list)]


def _extras(sample: SampleArrays) -> dict:
    names = ("min_p", "logprob_rows", "logprob_counts", "processors")
    return {name: getattr(sample, name) for name in names if getattr(sample, name) is not None}


def test_plain_batches_build_no_extra_array():
    rows = np.arange(3, dtype=np.int32)
    greedy, _ = prepare_sample(_decodes([SamplingParams(temperature=0)] * 3), rows)
    assert greedy == SampleArrays(rows)
    plain = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_p=0.9, seed=3), SamplingParams(temperature=0)]
    sample, sampled_ids = prepare_sample(_decodes(plain), rows)
    assert sampled_ids == [0, 1, 2] and _extras(sample) == {}
    assert set(sample.upload_arrays()) == {"logit_rows", "temperatures", "top_k", "top_p", "seeded_rows", "seed_keys",
                                           "output_indices"}
    tensors = sample.tensors({name: torch.from_numpy(array) for name, array in sample.upload_arrays().items()})
    assert (tensors.min_p, tensors.processors, tensors.logprob_rows) == (None, None, None)


def test_extras_appear_only_for_the_rows_that_ask():
    rows = np.arange(3, dtype=np.int32)
    params = [SamplingParams(temperature=0), SamplingParams(min_p=0.2, logprobs=4), SamplingParams(logit_bias={7: 1.0})]
    sample, _ = prepare_sample(_decodes(params), rows)
    assert sample.min_p.tolist() == [0.0, np.float32(0.2), 0.0]
    assert sample.logprob_rows.tolist() == [1] and sample.logprob_counts == [4]
    processors = sample.processors
    assert processors.bias_rows.tolist() == [2] and processors.bias_tokens.tolist() == [7]
    assert all(getattr(processors, f.name) is None for f in dataclasses.fields(processors)
               if not f.name.startswith("bias"))
