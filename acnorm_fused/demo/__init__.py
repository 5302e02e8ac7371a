"""The finetuning study behind ``acnorm demo``: real brain MRI (:mod:`.data`),
a small BatchNorm U-Net and the methods compared (:mod:`.study`)."""
