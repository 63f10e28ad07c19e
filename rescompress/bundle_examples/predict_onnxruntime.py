def open_model(pre):
    ort = need("onnxruntime", "pip install onnxruntime")
    opts = ort.SessionOptions()
    if pre.get("graph_optimization") == "disabled":  # run the QDQ graph as written, as its top-1 was measured
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(HERE / pre["artifact"]), opts, providers=["CPUExecutionProvider"])
    input_name, output_name = pre["input"]["name"], pre["output"]["name"]
    return lambda x: session.run([output_name], {input_name: x})[0]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
