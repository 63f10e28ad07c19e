def interpreter_class():
    """LiteRT's interpreter; the older tflite_runtime or TensorFlow's where LiteRT is not installed."""
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter", "tensorflow.lite"):
        try:
            return importlib.import_module(module).Interpreter
        except ImportError:
            continue
    sys.exit("this example needs LiteRT: pip install ai-edge-litert (or tflite-runtime)")


def open_model(pre):
    it = interpreter_class()(model_path=str(HERE / pre["artifact"]))
    it.allocate_tensors()
    inp = next(d for d in it.get_input_details() if d["name"] == pre["input"]["name"])
    out = next(d for d in it.get_output_details() if d["name"] == pre["output"]["name"])

    def run(x):
        it.set_tensor(inp["index"], x)
        it.invoke()
        return it.get_tensor(out["index"])

    return run


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
