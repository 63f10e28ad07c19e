def open_model(pre):
    """The serialized engine (built on this GPU with the trtexec command in model_card.md), with CuPy arrays
    as its input and output buffers."""
    trt = need("tensorrt", "pip install tensorrt (on a host with an NVIDIA GPU and CUDA)")
    cp = need("cupy", "pip install cupy-cuda12x (the CuPy wheel for your CUDA version)")
    engine_path = HERE / pre["engine"]
    if not engine_path.is_file():
        sys.exit(f"{engine_path.name} is not built yet; in this folder run: {pre['build_command']}")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        sys.exit(f"TensorRT could not load {engine_path.name}: built for another GPU or TensorRT version? "
                 f"Build it here: {pre['build_command']}")
    context = engine.create_execution_context()
    input_name, output_name = pre["input"]["name"], pre["output"]["name"]
    stream = cp.cuda.Stream(non_blocking=True)

    def run(x):
        x_gpu = cp.asarray(x, dtype=cp.dtype(trt.nptype(engine.get_tensor_dtype(input_name))))
        context.set_input_shape(input_name, x.shape)
        y_gpu = cp.empty(tuple(context.get_tensor_shape(output_name)),
                         dtype=cp.dtype(trt.nptype(engine.get_tensor_dtype(output_name))))
        context.set_tensor_address(input_name, x_gpu.data.ptr)
        context.set_tensor_address(output_name, y_gpu.data.ptr)
        cp.cuda.get_current_stream().synchronize()  # the input copy is done before the engine reads it
        if not context.execute_async_v3(stream.ptr):
            sys.exit("TensorRT inference failed (its log above says why)")
        stream.synchronize()
        return cp.asnumpy(y_gpu)

    run.owners = (runtime, engine, context)  # keep them alive as long as the function
    return run


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
