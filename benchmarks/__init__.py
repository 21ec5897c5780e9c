"""The benchmarks: each one a module, run from the repository root as ``python -m benchmarks.NAME``.

Training step (the arms of every training benchmark are defined once, in :mod:`benchmarks.arms`):

* ``train_step``: seconds per training step of prefixtune, PEFT and the floor (the frozen
  model's own forward + backward) on the bundled model, arms interleaved.
  ``python -m benchmarks.train_step --seq-len 128 512 --repeats 5``
* ``memory``: peak resident memory of one training step, each arm in a fresh process.
  ``python -m benchmarks.memory --seq-lens 512 1024 2048 --tokens 4096``
* ``scaling``: step time and memory against prefix length, sequence length and prefixed layers.
  ``python -m benchmarks.scaling --json /tmp/bench/scaling.json``
* ``step_profile``: which ops make up the difference between two arms' steps (torch.profiler).
  ``python -m benchmarks.step_profile --seq-len 128 --steps 6``
* ``op_count``: how many aten ops (on a GPU: kernel launches) a step dispatches, per arm and policy.
  ``python -m benchmarks.op_count --json /tmp/bench/op-count.json``
* ``attention_kernel``: SDPA alone, forward + backward, as each attention route calls it.
  ``python -m benchmarks.attention_kernel --seq-lens 128 512``
* ``head_chunks``: what one chunk of the chunked loss costs per row, at several chunk sizes.
  ``python -m benchmarks.head_chunks --rows 1024 512 384 341 320 256 128``

Generation and serving:

* ``generate``: greedy decoding throughput, plain vs prefixtune vs PEFT, and many prefixes in one batch.
  ``python -m benchmarks.generate --batch-sizes 1 8 --new-tokens 64 --repeats 5``
* ``decode_profile``: which ops make up the difference between plain and prefixed decoding.
  ``python -m benchmarks.decode_profile --batch-size 8 --new-tokens 32``
* ``serve``: the real server's throughput, N prefixes mixed in one batch vs one prefix at a time.
  ``python -m benchmarks.serve --prefixes 4 8 16 --new-tokens 32 --repeats 3``

On a GPU:

* ``gpu``: every GPU measurement in one run (policy check, SDPA kernels, training steps and
  memory, generation, scaling, profile). ``python -m benchmarks.gpu --json /tmp/bench/gpu.json``;
  ``python -m benchmarks.gpu --smoke`` checks it on a CPU.

Quality:

* ``sst2``: SST-2 with the bundled MiniLM encoder, prefix + head against the head alone.
  ``python -m benchmarks.sst2``
* ``e2e_study``: the E2E study, prefix tuning against LoRA and the other methods, and low data.
  ``python -m benchmarks.e2e_study --phase all``
* ``webnlg_study``: WebNLG trained on 7 categories, scored on them and on the 3 held out, several methods and seeds.
  ``python -m benchmarks.webnlg_study``
* ``recipe_study``: the prefix recipes (flat / MLP, random / words, clipping) with LoRA and full
  fine-tuning on E2E, WebNLG and SST-2 at two budgets and three seeds. ``python -m benchmarks.recipe_study``

Shared pieces: :mod:`benchmarks.study` (the studies' resumable runs, workers and shards),
:mod:`benchmarks.arms` (the training arms), :mod:`benchmarks.common` (the header of
every results file: command, machine, code version; interleaving and paired ratios),
:mod:`benchmarks.shapes` (random-weight models of named shapes), :mod:`benchmarks.profiling`
(profiler op totals). Every ``--json`` file starts with ``command``, ``machine`` and
``code_version``; results kept for the docs live in ``benchmarks/results``.
"""
