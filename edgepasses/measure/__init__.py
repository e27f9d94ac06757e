"""Measurement shared by the benchmarks (`edgepasses.bench`) and the search: fair interleaved timing
(`timing`) and the peers we are measured against (`peers`: OpenVINO direct, NNCF int8). The models
measured live in `edgepasses.zoo`."""
