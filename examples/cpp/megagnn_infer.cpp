// megagnn_infer: energy, forces and stress of one structure from a megagnn inference package.
//
//   megagnn_infer model.pt2 structure.xyz [--head K] [--allow-unknown-elements]
//
// Reads the first frame of an extended-XYZ file (Lattice, pbc and Properties in the comment
// line; plain XYZ is a molecule), builds the neighbour list within the package's cutoff
// (periodic images included), runs the AOTInductor package and prints
//
//   energy <E>                 eV
//   forces                     then N lines "fx fy fz", eV/Å
//   stress                     then 3 lines, eV/Å^3 (periodic cells, if the model has stress)
//
// Inputs follow the package's calling convention (megagnn/inference/package.py). Elements
// the model was not trained on (the package's "elements" metadata) are refused unless
// --allow-unknown-elements: the model would serve them from an untrained embedding.

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

const char* kSymbols[] = {
    "X",  "H",  "He", "Li", "Be", "B",  "C",  "N",  "O",  "F",  "Ne", "Na", "Mg", "Al", "Si",
    "P",  "S",  "Cl", "Ar", "K",  "Ca", "Sc", "Ti", "V",  "Cr", "Mn", "Fe", "Co", "Ni", "Cu",
    "Zn", "Ga", "Ge", "As", "Se", "Br", "Kr", "Rb", "Sr", "Y",  "Zr", "Nb", "Mo", "Tc", "Ru",
    "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te", "I",  "Xe", "Cs", "Ba", "La", "Ce", "Pr",
    "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W",
    "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac",
    "Th", "Pa", "U",  "Np", "Pu", "Am", "Cm", "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf",
    "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og"};

struct Structure {
  std::vector<int64_t> numbers;               // [N]
  std::vector<double> positions;              // [N * 3] Å
  std::array<double, 9> cell{};               // rows are lattice vectors, Å
  std::array<bool, 3> pbc{false, false, false};
};

int atomic_number(const std::string& symbol) {
  for (int z = 1; z < static_cast<int>(sizeof(kSymbols) / sizeof(kSymbols[0])); ++z)
    if (symbol == kSymbols[z]) return z;
  throw std::runtime_error("unknown element symbol '" + symbol + "'");
}

// key=value pairs of an extxyz comment line; values may be "quoted"
std::map<std::string, std::string> parse_comment(const std::string& line) {
  std::map<std::string, std::string> out;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && std::isspace(static_cast<unsigned char>(line[i]))) ++i;
    size_t eq = line.find('=', i);
    if (eq == std::string::npos) break;
    std::string key = line.substr(i, eq - i);
    i = eq + 1;
    std::string value;
    if (i < line.size() && line[i] == '"') {
      size_t end = line.find('"', i + 1);
      if (end == std::string::npos) throw std::runtime_error("unterminated quote in comment line");
      value = line.substr(i + 1, end - i - 1);
      i = end + 1;
    } else {
      size_t end = i;
      while (end < line.size() && !std::isspace(static_cast<unsigned char>(line[end]))) ++end;
      value = line.substr(i, end - i);
      i = end;
    }
    for (auto& c : key) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    out[key] = value;
  }
  return out;
}

Structure read_extxyz(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::string line;
  if (!std::getline(in, line)) throw std::runtime_error(path + " is empty");
  const long n = std::stol(line);
  if (n < 1) throw std::runtime_error(path + ": the first line must be the number of atoms");
  std::getline(in, line);
  auto info = parse_comment(line);

  Structure s;
  if (info.count("lattice")) {
    std::istringstream ls(info["lattice"]);
    for (auto& x : s.cell)
      if (!(ls >> x)) throw std::runtime_error(path + ": Lattice needs 9 numbers");
    s.pbc = {true, true, true};  // extxyz: a lattice without pbc means periodic
  }
  if (info.count("pbc")) {
    std::istringstream ps(info["pbc"]);
    for (auto& p : s.pbc) {
      std::string flag;
      ps >> flag;
      p = flag == "T" || flag == "True" || flag == "true" || flag == "1";
    }
  }
  // column of species and of the first position component
  int species_col = 0, pos_col = 1, col = 0;
  if (info.count("properties")) {
    std::istringstream ps(info["properties"]);
    std::string name, type, count;
    species_col = pos_col = -1;
    while (std::getline(ps, name, ':') && std::getline(ps, type, ':') &&
           std::getline(ps, count, ':')) {
      if (name == "species") species_col = col;
      if (name == "pos") pos_col = col;
      col += std::stoi(count);
    }
    if (species_col < 0 || pos_col < 0)
      throw std::runtime_error(path + ": Properties must list species and pos");
  }
  for (long a = 0; a < n; ++a) {
    if (!std::getline(in, line)) throw std::runtime_error(path + ": fewer atoms than declared");
    std::istringstream ls(line);
    std::vector<std::string> fields;
    for (std::string f; ls >> f;) fields.push_back(f);
    if (static_cast<int>(fields.size()) < std::max(species_col + 1, pos_col + 3))
      throw std::runtime_error(path + ": atom line " + std::to_string(a + 1) + " is too short");
    s.numbers.push_back(atomic_number(fields[species_col]));
    for (int k = 0; k < 3; ++k) s.positions.push_back(std::stod(fields[pos_col + k]));
  }
  return s;
}

// Directed edges (sender j, receiver i, lattice shift S) with 0 < |x_j + S @ cell - x_i| < rc,
// sorted by receiver, in time linear in the number of atoms: every atom's periodic images
// within reach are binned into cubes of side rc, and each atom looks only at the 27 cubes
// around it.
void neighbour_list(const Structure& s, double cutoff, std::vector<int64_t>& senders,
                    std::vector<int64_t>& receivers, std::vector<double>& shifts) {
  const auto& c = s.cell;
  const double signed_volume = c[0] * (c[4] * c[8] - c[5] * c[7]) -
                               c[1] * (c[3] * c[8] - c[5] * c[6]) +
                               c[2] * (c[3] * c[7] - c[4] * c[6]);
  const double volume = std::abs(signed_volume);
  const size_t n = s.numbers.size();
  std::array<int, 3> reps{0, 0, 0};
  for (int k = 0; k < 3; ++k) {
    if (!s.pbc[k]) continue;
    const double* u = &c[3 * ((k + 1) % 3)];
    const double* v = &c[3 * ((k + 2) % 3)];
    const double cross[3] = {u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2],
                             u[0] * v[1] - u[1] * v[0]};
    const double area = std::sqrt(cross[0] * cross[0] + cross[1] * cross[1] + cross[2] * cross[2]);
    if (volume < 1e-12 || area < 1e-12) throw std::runtime_error("periodic cell with no volume");
    // layers of images within the cutoff, plus how far atoms stray outside the cell
    double lo = 0.0, hi = 1.0;
    for (size_t a = 0; a < n; ++a) {
      const double* x = &s.positions[3 * a];
      const double frac = (x[0] * cross[0] + x[1] * cross[1] + x[2] * cross[2]) / signed_volume;
      lo = std::min(lo, frac);
      hi = std::max(hi, frac);
    }
    reps[k] = static_cast<int>(std::ceil(cutoff / (volume / area) + (hi - lo - 1.0)));
  }
  if (n == 0) return;
  // the box around the atoms, widened by the cutoff: images outside it have no neighbours
  std::array<double, 3> lo{}, hi{};
  for (int k = 0; k < 3; ++k) lo[k] = hi[k] = s.positions[k];
  for (size_t a = 0; a < n; ++a)
    for (int k = 0; k < 3; ++k) {
      lo[k] = std::min(lo[k], s.positions[3 * a + k]);
      hi[k] = std::max(hi[k], s.positions[3 * a + k]);
    }
  for (int k = 0; k < 3; ++k) lo[k] -= cutoff, hi[k] += cutoff;
  auto bin_of = [&](const double* x, int k) {
    return static_cast<int64_t>(std::floor((x[k] - lo[k]) / cutoff));
  };
  auto key = [](int64_t bx, int64_t by, int64_t bz) { return (bx * 1048576 + by) * 1048576 + bz; };
  struct Image {
    int64_t atom;
    int a, b, d;
    double x[3];
  };
  std::vector<Image> images;
  std::unordered_map<int64_t, std::vector<size_t>> bins;
  for (size_t j = 0; j < n; ++j)
    for (int a = -reps[0]; a <= reps[0]; ++a)
      for (int b = -reps[1]; b <= reps[1]; ++b)
        for (int d = -reps[2]; d <= reps[2]; ++d) {
          Image im{static_cast<int64_t>(j), a, b, d, {}};
          bool inside = true;
          for (int k = 0; k < 3; ++k) {
            im.x[k] = s.positions[3 * j + k] + a * c[k] + b * c[3 + k] + d * c[6 + k];
            inside = inside && im.x[k] >= lo[k] && im.x[k] <= hi[k];
          }
          if (!inside) continue;
          bins[key(bin_of(im.x, 0), bin_of(im.x, 1), bin_of(im.x, 2))].push_back(images.size());
          images.push_back(im);
        }
  const double rc2 = cutoff * cutoff;
  for (size_t i = 0; i < n; ++i) {
    const double* xi = &s.positions[3 * i];
    const int64_t bx = bin_of(xi, 0), by = bin_of(xi, 1), bz = bin_of(xi, 2);
    for (int64_t dx = -1; dx <= 1; ++dx)
      for (int64_t dy = -1; dy <= 1; ++dy)
        for (int64_t dz = -1; dz <= 1; ++dz) {
          auto found = bins.find(key(bx + dx, by + dy, bz + dz));
          if (found == bins.end()) continue;
          for (size_t m : found->second) {
            const Image& im = images[m];
            if (im.atom == static_cast<int64_t>(i) && im.a == 0 && im.b == 0 && im.d == 0)
              continue;
            double r2 = 0.0;
            for (int k = 0; k < 3; ++k) r2 += (im.x[k] - xi[k]) * (im.x[k] - xi[k]);
            if (r2 >= rc2) continue;
            if (r2 < 1e-8)  // (1e-4 Å)^2: the energy is undefined where atoms coincide
              throw std::runtime_error(
                  (im.atom == static_cast<int64_t>(i)
                       ? "atom " + std::to_string(i) + " and its periodic image"
                       : "atoms " + std::to_string(i) + " and " + std::to_string(im.atom)) +
                  " coincide (under 1e-4 Å apart): the energy is undefined there");
            senders.push_back(im.atom);
            receivers.push_back(static_cast<int64_t>(i));
            shifts.insert(shifts.end(), {double(im.a), double(im.b), double(im.d)});
          }
        }
  }
}

at::Tensor from_vector(const std::vector<double>& v, std::vector<int64_t> shape) {
  return torch::tensor(v, torch::kFloat64).reshape(shape);
}

}  // namespace

// The first line of an error message (torch's carry context and stack frames after it).
std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

int main(int argc, char** argv) {
  if (argc < 3 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::cerr << "usage: megagnn_infer model.pt2 structure.xyz [--head K] [--allow-unknown-elements]\n"
                 "Energy (eV), forces (eV/Å) and, for periodic cells, stress (eV/Å^3) of the\n"
                 "first frame of an extended-XYZ file, from a megagnn inference package.\n";
    return argc < 3 ? 2 : 0;
  }
  int64_t head = 0;
  bool allow_unknown = false;
  for (int a = 3; a < argc; ++a) {
    const std::string flag = argv[a];
    if (flag == "--allow-unknown-elements") {
      allow_unknown = true;
    } else if (flag == "--head" && a + 1 < argc) {
      head = std::stoll(argv[++a]);
    } else {
      std::cerr << "megagnn_infer: unknown argument " << flag << "\n";
      return 2;
    }
  }
  try {
    torch::NoGradGuard no_grad;
    std::unique_ptr<torch::inductor::AOTIModelPackageLoader> package;
    try {
      package = std::make_unique<torch::inductor::AOTIModelPackageLoader>(argv[1]);
    } catch (const c10::Error& err) {  // its what() carries a C++ stack trace
      throw std::runtime_error(std::string(argv[1]) + ": unreadable inference package (" +
                               first_line(err.what_without_backtrace()) + ")");
    }
    auto& loader = *package;
    auto meta = loader.get_metadata();
    if (meta["format"] != "megagnn-aoti-1")
      throw std::runtime_error(std::string(argv[1]) + " is not a megagnn inference package");
    const double cutoff = std::stod(meta["cutoff"]);

    Structure s = read_extxyz(argv[2]);
    if (!allow_unknown && !meta["elements"].empty()) {
      std::vector<int64_t> known;
      std::istringstream list(meta["elements"]);
      for (std::string z; std::getline(list, z, ',');) known.push_back(std::stoll(z));
      for (int64_t z : s.numbers)
        if (std::find(known.begin(), known.end(), z) == known.end())
          throw std::runtime_error(std::string(kSymbols[z]) + " (Z=" + std::to_string(z) +
                                   ") is not in the training data of this model "
                                   "(--allow-unknown-elements to evaluate anyway)");
    }
    std::vector<int64_t> senders, receivers;
    std::vector<double> shifts;
    neighbour_list(s, cutoff, senders, receivers, shifts);
    const int64_t n = static_cast<int64_t>(s.numbers.size());
    const int64_t e = static_cast<int64_t>(senders.size());

    std::vector<int64_t> index(senders);
    index.insert(index.end(), receivers.begin(), receivers.end());
    std::vector<at::Tensor> inputs = {
        from_vector(s.positions, {n, 3}),
        torch::tensor(s.numbers, torch::kInt64),
        from_vector(std::vector<double>(s.cell.begin(), s.cell.end()), {3, 3}),
        torch::tensor({int64_t(s.pbc[0]), int64_t(s.pbc[1]), int64_t(s.pbc[2])}).to(torch::kBool),
        torch::tensor(index, torch::kInt64).reshape({2, e}),
        from_vector(shifts, {e, 3}),
        torch::tensor(head, torch::kInt64),
    };
    if (meta["dtype"] == "float32")
      for (int k : {0, 2, 5}) inputs[k] = inputs[k].to(torch::kFloat32);
    auto out = loader.run(inputs);
    const auto forces = out[1].to(torch::kFloat64).contiguous();
    const auto stress = out[2].to(torch::kFloat64).contiguous();
    std::printf("energy %.12f\nforces\n", out[0].to(torch::kFloat64).item<double>());
    const double* f = forces.data_ptr<double>();
    for (int64_t a = 0; a < n; ++a)
      std::printf("%.12e %.12e %.12e\n", f[3 * a], f[3 * a + 1], f[3 * a + 2]);
    if (meta["stress"] == "true" && s.pbc[0] && s.pbc[1] && s.pbc[2]) {
      const double* sg = stress.data_ptr<double>();
      std::printf("stress\n");
      for (int r = 0; r < 3; ++r)
        std::printf("%.12e %.12e %.12e\n", sg[3 * r], sg[3 * r + 1], sg[3 * r + 2]);
    }
  } catch (const c10::Error& err) {
    std::cerr << "megagnn_infer: " << first_line(err.what_without_backtrace()) << "\n";
    return 1;
  } catch (const std::exception& err) {
    std::cerr << "megagnn_infer: " << err.what() << "\n";
    return 1;
  }
  return 0;
}
