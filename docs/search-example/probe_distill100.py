"""A manual probe, not a search result: trial 3 of docs/search-example/run (int8 + prune 0.25 on layer2-4)
with 100 flash-distillation steps instead of the search's 20, timed beside NNCF int8 in one run (100 rounds).

Output on 2026-11-29 11:19 UTC (load average 3.9 before and after timing):
    prune 0.25 L2-4 + distill 100 (lr 1e-4) + int8: acc 96.67, build 404s, cand 8.31 (7.46) nncf 11.39 (10.29) ratio 1.37
(median ms (min ms); the float model: 97.22; with 20 steps the search measured 93.61.)

Run: python docs/search-example/probe_distill100.py
"""
import os, time
from edgepasses.zoo import get_model
from edgepasses.measure.peers import nncf_int8
from edgepasses.search.evaluate import Evaluator, time_programs
from edgepasses.api import lower
zoo=get_model("digits_resnet18", 8)
data=zoo.calibration(2)
dd=[b[0] for b in zoo.calibration(8)]
ig="ignore=['conv1([.].*)?','layer1([.].*)?','fc([.].*)?']"
head=f"fold_bn,prune(ratio=0.25,{ig})"
nncf=nncf_int8(zoo.module, zoo.example_inputs, data)
for steps in (100,):
    ev=Evaluator(zoo.module, zoo.example_inputs, data, target="openvino", distill_steps=steps, distill_data=dd, distill_lr=1e-4)
    t=time.time(); gm,_,d=ev.compress(head, "quantize,dce"); prog=lower(gm, zoo.example_inputs, target="openvino")
    acc=zoo.accuracy_fn(prog)
    print("load", os.getloadavg())
    tm=time_programs({"cand":lambda: prog(*zoo.example_inputs), "nncf":lambda: nncf(*zoo.example_inputs)}, 3, 100)
    print("load", os.getloadavg())
    print(f"prune 0.25 L2-4 + distill {steps} (lr 1e-4) + int8: acc {acc:.2f}, build {time.time()-t:.0f}s, cand {tm['cand'].median_ms:.2f} ({tm['cand'].min_ms:.2f}) nncf {tm['nncf'].median_ms:.2f} ({tm['nncf'].min_ms:.2f}) ratio {tm['nncf'].median_ms/tm['cand'].median_ms:.2f}", d["loss_start"], d["loss_end"], flush=True)
