"""Which ops have real fp16 kernels on ONNX Runtime's CPU execution provider (the list behind
fleetbench's fp16 recipe, optimizer/src/fp16.rs CPU_FP16_OPS).

For each op, a one-node model with float16 tensors is loaded with graph optimizations disabled and the
model ONNX Runtime actually runs is saved: when the op has no fp16 kernel, the runtime inserts Cast
nodes to float around it (InsertCastTransformer), so an op counts as fp16 only when no Cast appears.

    .venv/bin/python models/probe_fp16_ops.py
"""
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

OPT = os.path.join(tempfile.mkdtemp(), 'optimized.onnx')
from onnx import helper as h, TensorProto as T
ops = {
 'Add':2,'Sub':2,'Mul':2,'Div':2,'Relu':1,'MatMul':2,'Sigmoid':1,'Tanh':1,'Softmax':1,'Concat':2,'Reshape':None,'Transpose':1,
 'Conv':None,'MaxPool':None,'AveragePool':None,'GlobalAveragePool':1,'BatchNormalization':None,'Gemm':2,'Sum':2,'Dropout':1,'Flatten':1,
 'LeakyRelu':1,'Clip':1,'Identity':1,'Exp':1,'Sqrt':1,'Pow':2,'ReduceMean':1,'Erf':1,'Abs':1,'Neg':1,'Max':2,'Min':2,'Gather':None,'Cast':None,'Where':None,'Slice':None,'Squeeze':None,'Unsqueeze':None,'LayerNormalization':None,'Gelu':1,'HardSigmoid':1,'Resize':None,'ConvTranspose':None,'Split':None,'Pad':None,'ReduceSum':None,'ArgMax':1,'TopK':None,'Log':1,'Reciprocal':1,'Floor':1,'Ceil':1,'Round':1,'Expand':None,'Tile':None,'InstanceNormalization':None,'PRelu':2,'Elu':1,'Selu':1,'Softplus':1,'HardSwish':1,'LogSoftmax':1,'Mish':1,'Einsum':None,'Range':None,'Equal':2,'Less':2,'Greater':2,'Not':None,'ReduceMax':1,'ReduceMin':1,'Shape':1,'Size':1,'Trilu':1,'CumSum':None,'GlobalMaxPool':1,'LpNormalization':1,'DepthToSpace':None,'SpaceToDepth':None,'Upsample':None,'Sign':1,'Neg':1,'IsNaN':1,'NonZero':1,'ScatterND':None,'GatherElements':None,'GatherND':None,'OneHot':None,'Mod':None,'BitShift':None,
}
import itertools
F = T.FLOAT16
x = h.make_tensor_value_info
ok=[];bad=[]
def model(op):
    shp=[2,4,4,4]
    ins=[x('a',F,shp)]; inits=[]; attrs={}; node_in=['a']
    n = ops[op]
    if n==2: ins.append(x('b',F,shp)); node_in=['a','b']
    if op=='MatMul': ins=[x('a',F,[4,4]),x('b',F,[4,4])]
    if op=='Gemm': ins=[x('a',F,[4,4]),x('b',F,[4,4])]
    if op=='PRelu': ins=[x('a',F,shp),x('b',F,[1])]
    if op=='Conv' or op=='ConvTranspose':
        inits=[h.make_tensor('w',F,[4,4,3,3],np.ones(144).astype(np.float16).view(np.uint16).tolist())]; node_in=['a','w']; attrs={'pads':[1,1,1,1]}
    if op in('MaxPool','AveragePool'): attrs={'kernel_shape':[2,2]}
    if op=='BatchNormalization':
        for p in 'sbmv': inits.append(h.make_tensor(p,F,[4],np.ones(4).astype(np.float16).view(np.uint16).tolist()))
        node_in=['a','s','b','m','v']
    if op=='Reshape':
        inits=[h.make_tensor('s',T.INT64,[2],[2,64])]; node_in=['a','s']
    if op=='Gather':
        inits=[h.make_tensor('i',T.INT64,[2],[0,1])]; node_in=['a','i']
    if op=='Concat': attrs={'axis':1}
    if op=='LayerNormalization':
        inits=[h.make_tensor('s',F,[4],np.ones(4).astype(np.float16).view(np.uint16).tolist())]; node_in=['a','s']
    if op=='Slice':
        inits=[h.make_tensor('st',T.INT64,[1],[0]),h.make_tensor('en',T.INT64,[1],[1])]; node_in=['a','st','en']
    if op=='Unsqueeze' or op=='Squeeze' or op=='ReduceSum':
        inits=[h.make_tensor('ax',T.INT64,[1],[0])]; node_in=['a','ax']
    if op=='Resize':
        inits=[h.make_tensor('sc',T.FLOAT,[4],[1,1,2,2])]; node_in=['a','','sc']
    if op=='Pad':
        inits=[h.make_tensor('p',T.INT64,[8],[0,0,1,1,0,0,1,1])]; node_in=['a','p']
    if op=='Split': attrs={'axis':1}; 
    if op=='Expand' or op=='Tile':
        inits=[h.make_tensor('s',T.INT64,[4],[1,1,1,1] if op=='Tile' else [2,4,4,4])]; node_in=['a','s']
    if op=='InstanceNormalization':
        for p in 'sb': inits.append(h.make_tensor(p,F,[4],np.ones(4).astype(np.float16).view(np.uint16).tolist()))
        node_in=['a','s','b']
    if op=='CumSum':
        inits=[h.make_tensor('ax',T.INT64,[],[1])]; node_in=['a','ax']
    if op=='Where':
        ins=[x('c',T.BOOL,shp),x('a',F,shp),x('b',F,shp)]; node_in=['c','a','b']
    if op=='Cast': attrs={'to':T.FLOAT}
    if op=='TopK':
        inits=[h.make_tensor('k',T.INT64,[1],[2])]; node_in=['a','k']
    if op=='DepthToSpace' or op=='SpaceToDepth': attrs={'blocksize':2}
    if op=='Einsum': attrs={'equation':'abcd->abdc'}
    outs=['y'] if op not in ('TopK','Split') else (['y','z'] if op=='TopK' else ['y','z'])
    if op in ('Range','Not','OneHot','Mod','BitShift','Upsample','ScatterND','GatherElements','GatherND'): return None
    node=h.make_node(op,node_in,outs,**attrs)
    g=h.make_graph([node],'g',ins,[onnx.ValueInfoProto(name=o) for o in outs],inits)
    dom='' 
    return h.make_model(g,opset_imports=[h.make_opsetid('',17 if op not in('Gelu',) else 20)],ir_version=9)
for op in ops:
    m=model(op)
    if m is None: continue
    try:
        s=ort.InferenceSession(m.SerializeToString(),providers=['CPUExecutionProvider'])
        ok.append(op)
    except Exception as e:
        msg=str(e)
        bad.append((op,msg[:100]))
print("---- real fp16 kernels (no Cast inserted by ORT) ----")
real=[];cast=[]
for op in ok:
    m=model(op)
    so=ort.SessionOptions(); so.graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.optimized_model_filepath=OPT
    ort.InferenceSession(m.SerializeToString(),so,providers=['CPUExecutionProvider'])
    o=onnx.load(OPT)
    n=sum(1 for nd in o.graph.node if nd.op_type=='Cast')
    (cast if n>(1 if op=='Cast' else 0) else real).append(op)
print("FP16", sorted(real))
print("CASTED", sorted(cast))
