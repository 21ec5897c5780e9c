"""Everything that touches Hugging Face PEFT, in one place.

* :mod:`.wrappers`: how to see through PEFT's model wrappers (without importing ``peft``);
* :mod:`.lora`: a prefix trained together with a PEFT adapter (LoRA, QLoRA), saved beside it;
* :mod:`.interop`: PEFT prefix-tuning checkpoints converted to and from prefixtune prefixes;
* :mod:`.cli`: the ``export-peft`` and ``import-peft`` commands.

``peft`` itself (the optional ``prefixtune[peft]`` extra) is imported only inside the functions
that need it.
"""
