"""Building bundles (the layer under `oodserve.models.fit`, never importing it): fitting signals (`signals`), the one
calibrate-and-write path (`calibrate`), the label-free fusion choice (`fusion_choice`), running exported models over a
data set (`onnx_outputs`) and the closed-form demo bundle (`demo`). The shipped bundles are data under models/bundles/."""
