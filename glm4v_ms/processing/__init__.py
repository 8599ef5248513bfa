"""Inputs -> model tensors: media sources (paths, URLs, data URIs, PDF and office documents), image and video
preprocessing, the processor (chat template, placeholder expansion) and the offline test tokenizer. numpy + PIL only
(plus optional PyAV, pypdfium2 and a LibreOffice subprocess for office documents); imports nothing above it."""
