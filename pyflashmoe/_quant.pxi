# _quant.pxi: quantizer and kernel entry points (owned by the quantizer work)
