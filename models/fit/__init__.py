"""`oodserve fit DATA --out BUNDLE`: any image or vector data set -> a trained, calibrated, verified bundle."""
