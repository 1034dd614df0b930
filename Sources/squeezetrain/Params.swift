import ArgumentParser
import SqueezeTraining
import SqueezeEngine

struct Params: ReportingCommand {
    static let configuration = CommandConfiguration(
        abstract: "Per-layer parameter table (like the paper's Table 1) with multiply-accumulates per image, the totals and the model size.",
        discussion: "MACs count one image's forward pass through the convolutions and linear layers (Cout·Hout·Wout·Cin·k·k; bias, BatchNorm and pooling not counted). A training step costs about 3× that per image (forward, backward-data, backward-weights), so a run's training compute is epochs × 50,000 × 3 × MACs.")

    @OptionGroup var modelOptions: ModelOptions
    @Flag(help: "Print a JSON object instead of the table.")
    var json = false

    struct Report: Encodable {
        struct Row: Encodable { var name: String; var shape: [Int]; var parameters: Int; var output: [Int]; var macs: Int }
        var model: String, classes: Int, stem: String, lateDownsample: Bool, batchNorm: Bool, bypass: String
        var inputSize: Int
        var totalParameters: Int
        /// Forward multiply-accumulates per image.
        var macs: Int
        var layers: [Row]
        var bytesFp32: Int, bytesFp16: Int, bytesInt8: Int
    }

    func execute() throws {
        let config = modelOptions.config
        let net = Network(config: config)
        let total = net.parameters.count
        let rows = net.summary(inputSize: config.inputSize).map {
            Report.Row(name: $0.name, shape: $0.weightShape, parameters: $0.parameters, output: $0.output, macs: $0.macs)
        }
        let report = Report(model: config.architecture.rawValue, classes: config.classes, stem: config.stem.rawValue,
                            lateDownsample: config.lateDownsample, batchNorm: config.batchNorm, bypass: config.bypass.rawValue,
                            inputSize: config.inputSize, totalParameters: total, macs: rows.reduce(0) { $0 + $1.macs }, layers: rows,
                            bytesFp32: 4 * total, bytesFp16: 2 * total, bytesInt8: total)
        if json { return try printJSON(report) }

        print("\(report.model), \(report.stem) stem, \(report.classes) classes, input 3×\(report.inputSize)×\(report.inputSize)"
              + (config.lateDownsample ? ", late downsampling" : "") + (config.batchNorm ? ", batch norm" : "")
              + (config.bypass == .simple ? ", simple bypass" : ""))
        print(pad("layer", 26) + pad("output", 14) + pad("weight", 18) + pad("parameters", 12, right: true) + pad("MACs", 16, right: true))
        for r in rows {
            print(pad(r.name, 26) + pad(r.output.map(String.init).joined(separator: "×"), 14)
                  + pad(r.shape.map(String.init).joined(separator: "×"), 18) + pad(grouped(r.parameters), 12, right: true)
                  + pad(grouped(r.macs), 16, right: true))
        }
        print(pad("total", 58) + pad(grouped(total), 12, right: true) + pad(grouped(report.macs), 16, right: true))
        print("model size: fp32 \(grouped(4 * total)) bytes (\(humanBytes(Double(4 * total)))), "
              + "fp16 \(grouped(2 * total)) bytes, int8 \(grouped(total)) bytes")
    }
}
