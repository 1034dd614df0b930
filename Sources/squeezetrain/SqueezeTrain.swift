import ArgumentParser

@main
struct SqueezeTrain: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "squeezetrain",
        abstract: "Data-parallel SqueezeNet training on CIFAR-10, measuring what each step sends over the wire.",
        subcommands: [Train.self, Eval.self, Launch.self, Join.self, CoordinatorCommand.self, WorkerCommand.self, Export.self, Params.self, Compress.self, Inspect.self, Keygen.self, Bench.self])
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks that print figures (run them on a quiet machine; compare ratios from one run).",
        subcommands: [BenchTrain.self, BenchAllReduce.self, BenchClusterCommand.self])
}
