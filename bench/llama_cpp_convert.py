"""Run llama.cpp's convert_hf_to_gguf.py on an extracted Phi-2, telling it which pre-tokenizer to use.

    python -m bench.llama_cpp_convert LLAMA_CPP_SOURCE HF_FOLDER [convert_hf_to_gguf options...]

The converter names a BPE model's pre-tokenizer (the regex that splits text before the merges) by
hashing how the tokenizer encodes a fixed test string and looking the hash up in a table of
known models; an unknown hash stops the conversion ("BPE pre-tokenizer was not recognized"). The
bench checkpoint's tokenizer is a small random byte-level BPE, so its hash is in no table — but it
splits text as GPT-2 does, which is what Phi-2's CodeGen tokenizer uses too (llama.cpp treats
"phi-2" and "gpt-2" as the same pre-tokenizer). Rather than patching the converter's source, this
runs its ``main()`` in this process after replacing the lookup on its Phi-2 class only, so the
vendored script stays as shipped and every other model keeps the real check.
"""

from __future__ import annotations

import sys
from pathlib import Path

PRE_TOKENIZER = "gpt-2"


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    source, rest = Path(argv[0]), argv[1:]
    sys.path[:0] = [str(source), str(source / "gguf-py")]  # the vendored converter and its gguf package
    import convert_hf_to_gguf
    from conversion.phi import Phi2Model

    Phi2Model.get_vocab_base_pre = lambda self, tokenizer: PRE_TOKENIZER
    sys.argv = [str(source / "convert_hf_to_gguf.py"), *rest]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(sys.argv[1:])
