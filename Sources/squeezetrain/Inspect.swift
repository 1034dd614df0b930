import ArgumentParser
import Foundation
import SqueezeTraining
import SqueezeCompress

struct Inspect: ReportingCommand {
    static let configuration = CommandConfiguration(
        abstract: "What a compressed model (.sqz) holds, per layer: parameters, density, bits, bytes of codes, indices and codebook (the paper's Table 2).")

    @Argument(help: "A compressed model written by `squeezetrain compress`.")
    var file: String
    @Flag(help: "Print a JSON object instead of the table.")
    var json = false

    struct Report: Encodable {
        struct Layer: Encodable {
            var name: String, parameters: Int, density: Double, bits: Int
            var codeBytes: Int, indexBytes: Int, codebookBytes: Int, plainBytes: Int, totalBytes: Int
        }
        var file: String, model: String, fileBytes: Int, parameters: Int, keptParameters: Int, fp32Bytes: Int
        var compressionRatio: Double
        var layers: [Layer]
    }

    func execute() throws {
        let bytes = try readWholeFile(file)
        let model = try CompressedModel.decode(bytes, file: file)
        let fileBytes = bytes.count
        let layers = model.byteCounts().map {
            Report.Layer(name: $0.name, parameters: $0.parameters, density: $0.density, bits: $0.bits, codeBytes: $0.codeBytes,
                         indexBytes: $0.indexBytes, codebookBytes: $0.codebookBytes, plainBytes: $0.plainBytes, totalBytes: $0.total)
        }
        let parameters = layers.reduce(0) { $0 + $1.parameters }
        let kept = layers.reduce(0) { $0 + Int(($1.density * Double($1.parameters)).rounded()) }
        let report = Report(file: file, model: model.config.architecture.rawValue, fileBytes: fileBytes, parameters: parameters,
                            keptParameters: kept, fp32Bytes: 4 * parameters, compressionRatio: Double(4 * parameters) / Double(fileBytes),
                            layers: layers)
        if json { return try printJSON(report) }
        print("\(file): \(report.model), \(grouped(fileBytes)) bytes, \(grouped(parameters)) parameters of which \(grouped(kept)) kept "
              + String(format: "(%.1f%%); fp32 %@ bytes, %.1f× smaller", 100 * Double(kept) / Double(max(parameters, 1)), grouped(4 * parameters), report.compressionRatio))
        print(pad("tensor", 34) + pad("parameters", 12, right: true) + pad("density", 9, right: true) + pad("bits", 6, right: true)
              + pad("codes", 10, right: true) + pad("indices", 10, right: true) + pad("codebook", 10, right: true)
              + pad("plain", 10, right: true) + pad("total", 10, right: true))
        for l in layers {
            print(pad(l.name, 34) + pad(grouped(l.parameters), 12, right: true) + pad(String(format: "%.1f%%", 100 * l.density), 9, right: true)
                  + pad("\(l.bits)", 6, right: true) + pad(grouped(l.codeBytes), 10, right: true) + pad(grouped(l.indexBytes), 10, right: true)
                  + pad(grouped(l.codebookBytes), 10, right: true) + pad(grouped(l.plainBytes), 10, right: true) + pad(grouped(l.totalBytes), 10, right: true))
        }
        let sum = { (f: (Report.Layer) -> Int) in grouped(layers.reduce(0) { $0 + f($1) }) }
        print(pad("total", 34) + pad(grouped(parameters), 12, right: true) + pad("", 15) + pad(sum(\.codeBytes), 10, right: true)
              + pad(sum(\.indexBytes), 10, right: true) + pad(sum(\.codebookBytes), 10, right: true) + pad(sum(\.plainBytes), 10, right: true)
              + pad(sum(\.totalBytes), 10, right: true))
        print("(the file adds \(grouped(fileBytes - layers.reduce(0) { $0 + $1.totalBytes })) bytes of header, names, shapes and checksum)")
    }
}
