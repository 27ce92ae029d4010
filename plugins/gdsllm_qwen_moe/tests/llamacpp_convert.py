"""Run llama.cpp's own convert_hf_to_gguf.py on a tiny Qwen3.5-MoE folder written by transformers (which has no
tokenizer files): the vocabulary is given to the converter directly (byte-level tokens, `qwen35` pre-tokenizer),
everything else (hyper-parameters, tensor names, layouts, types) is llama.cpp's.

usage: python llamacpp_convert.py LLAMACPP_DIR HF_FOLDER OUT.gguf OUTTYPE [CONVERTER FLAGS...]"""

import sys
from pathlib import Path


def main() -> None:
    llamacpp, folder, out, outtype, *flags = sys.argv[1:]
    sys.path[:0] = [str(Path(llamacpp) / "gguf-py"), llamacpp]
    import convert_hf_to_gguf
    from conversion import qwen

    def vocabulary(self):
        size = self.hparams.get("vocab_size") or self.hparams["text_config"]["vocab_size"]
        return [f"<t{i}>" for i in range(size)], [1] * size, "qwen35"  # normal tokens

    qwen.Qwen3_5MoeTextModel.get_vocab_base = vocabulary
    sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", outtype, "--no-mtp", *flags]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
