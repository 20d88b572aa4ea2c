"""The GGUF file layer: validated reading (:mod:`.reader`), dequantization (:mod:`.dequant`),
whole-file loading (:mod:`.loader`) and the hyperparameter reader models use (:mod:`.hparams`)."""
