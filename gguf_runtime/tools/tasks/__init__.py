"""HellaSwag, WinoGrande, multiple choice and KL-divergence, scored as llama-perplexity scores them.

Facts from llama.cpp's tools/perplexity/perplexity.cpp, reimplemented:

- **Task choice.** With fewer tasks asked than the file holds, tasks are drawn with ``std::mt19937``
  seeded with 1: HellaSwag through ``std::uniform_int_distribution<size_t>(0, n_left - 1)`` (libstdc++'s
  Lemire draw for a 32-bit engine) removing each pick; WinoGrande and multiple choice through
  ``int(float(1 / 2^32) * float(rng()) * float(n_left))`` with swap-remove. :class:`MT19937` is the
  generator, checked against the C++ standard's 10000th-output value.
- **Shared context.** Each ending is ``tokenize(context + " " + ending)`` with BOS; the tokens common
  to all endings are decoded once in one sequence, its memory copied (``seq_cp``) to the other
  endings' sequences, then the endings decoded. This works unchanged for recurrent memories.
- **Scores.** HellaSwag / multiple choice: mean log-probability of each ending's tokens (the first
  from the common prefix's last logits); accuracy with a Wilson 95% interval. WinoGrande: mean
  log-probability of the tokens after the choice word (llama.cpp's ``k_min_trailing_ctx`` rule,
  including its use of the first sentence's last logits for the second choice when the choice is
  not skipped).
- **KL-divergence.** ``--kl-divergence-base`` writes llama.cpp's logits file (``_logits_``, n_ctx,
  n_vocab, n_chunk, tokens, then per scored token a float32 scale, a float32 min log-prob and
  n_vocab uint16 quantized log-probs, padded to even); ``--kl-divergence`` reads it and prints the
  same statistics.

Tasks are packed into one context as many at a time as fit (each in its own sequences): since every
op is batch-invariant, a task's scores do not depend on its neighbours, so packing only changes speed.
"""
from .choice import (ChoiceResult, common_prefix, decode_items, hellaswag, make_task_context, multiple_choice, wilson,
                     winogrande)
from .data import (MCTask, MT19937, HellaSwagTask, TaskError, WinograndeTask, load_hellaswag, load_multiple_choice,
                   load_winogrande, pick_swap_remove, read_prompt_file, select_hellaswag, write_multiple_choice)
from .kld import KLDStats, LogitsFile, LogitsWriter, kl_divergence, percentile, quantize_log_probs

__all__ = [
    "MT19937", "pick_swap_remove", "read_prompt_file", "HellaSwagTask", "load_hellaswag", "select_hellaswag",
    "WinograndeTask", "load_winogrande", "MCTask", "load_multiple_choice", "write_multiple_choice",
    "make_task_context", "common_prefix", "decode_items", "wilson", "ChoiceResult", "hellaswag", "multiple_choice", "winogrande",
    "quantize_log_probs", "LogitsWriter", "LogitsFile", "KLDStats", "percentile", "kl_divergence", "TaskError",
]
