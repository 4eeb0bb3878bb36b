"""Rules that build a Python extension module from CUDA and C++ sources with nvcc.

Bazel 4.2.3 has no CUDA support of its own and rules_cuda is not available offline, so these
rules call nvcc directly: one compile action per source file (so kernels build in parallel, as
with CMake) and one nvcc link into a shared library with the CUDA runtime linked statically.
They need no C++ toolchain from Bazel; nvcc uses the host compiler it finds on PATH (or in
NVCC_CCBIN, passed with --action_env).

  cuda_include_dir        a directory of headers: its -I path and the files as action inputs
  cuda_archs_flag         the build setting behind --//bazel:cuda_archs
  cuda_python_extension   the extension module (<module_name>.so)
  python_extension_test   runs a Python script against a built extension module
"""

CudaIncludeInfo = provider(
    doc = "A header directory for nvcc.",
    fields = {
        "path": "the directory, relative to the execution root (what -I gets)",
        "headers": "depset of the files under it, inputs of every compile action",
    },
)

CudaArchsInfo = provider(
    doc = "The CUDA architectures to compile for.",
    fields = {
        "spec": "the setting as given, ';' normalised to ',' (e.g. '80-real,90a-real')",
        "gencode": "the matching nvcc -gencode flags",
    },
)

def _join(*parts):
    return "/".join([p for p in parts if p])

def _cuda_include_dir_impl(ctx):
    path = _join(ctx.label.workspace_root, ctx.label.package, ctx.attr.dir)
    headers = depset(ctx.files.hdrs)
    return [
        CudaIncludeInfo(path = path, headers = headers),
        DefaultInfo(files = headers),
    ]

cuda_include_dir = rule(
    implementation = _cuda_include_dir_impl,
    attrs = {
        "dir": attr.string(mandatory = True, doc = "The include directory, relative to this package."),
        "hdrs": attr.label_list(allow_files = True, doc = "The files under it."),
    },
    doc = "A directory to put on nvcc's include path, with the headers it holds.",
)

def _gencode(entry, origin):
    # The syntax of CMake's CUDA_ARCHITECTURES, so that cuda/CMakeLists.txt and Bazel take the
    # same values: "90a-real" is SASS for sm_90a only, "90a-virtual" PTX only, "90a" both.
    arch, _, kind = entry.partition("-")
    digits = arch.rstrip("abcdefghijklmnopqrstuvwxyz")
    if not digits or not digits.isdigit() or kind not in ["", "real", "virtual"] or len(arch) - len(digits) > 1:
        fail("%s: bad CUDA architecture %r; expected entries such as 80-real, 90a-real, 90a, 90-virtual" %
             (origin, entry))
    codes = {
        "real": "sm_" + arch,
        "virtual": "compute_" + arch,
        "": "[sm_%s,compute_%s]" % (arch, arch),
    }
    return "-gencode=arch=compute_%s,code=%s" % (arch, codes[kind])

def _cuda_archs_flag_impl(ctx):
    value = ctx.build_setting_value.replace(";", ",")
    entries = [e.strip() for e in value.split(",") if e.strip()]
    if not entries:
        fail("%s is empty; give at least one CUDA architecture, e.g. 90a-real" % ctx.label)
    return [CudaArchsInfo(
        spec = ",".join(entries),
        gencode = [_gencode(e, str(ctx.label)) for e in entries],
    )]

cuda_archs_flag = rule(
    implementation = _cuda_archs_flag_impl,
    build_setting = config.string(flag = True),
    doc = "Comma- (or semicolon-) separated CUDA architectures in CMake's CUDA_ARCHITECTURES syntax.",
)

def _compile(ctx, nvcc, src, archs, gencode, defines, includes, system_includes, headers):
    is_cuda = src.extension == "cu"
    obj = ctx.actions.declare_file("_objs/%s/%s.o" % (ctx.label.name, src.short_path.replace("../", "external/")))
    args = ctx.actions.args()
    args.add_all(["-x", "cu" if is_cuda else "c++"])
    args.add_all(ctx.attr.copts)
    if is_cuda:
        args.add_all(ctx.attr.cuda_copts)
        args.add_all(gencode)
    args.add_all(["-D" + d for d in ctx.attr.defines + defines])
    if ctx.attr.archs_define:
        # Lets the module report the architectures it was built for (JEVO_CUDA_ARCHS in CMake).
        args.add('-D%s="%s"' % (ctx.attr.archs_define, archs.spec))
    for inc in includes:
        args.add("-I" + inc.path)
    for inc in system_includes:
        args.add_all(["-isystem", inc.path])
    args.add_all(["-c", src, "-o", obj])
    ctx.actions.run(
        executable = nvcc,
        arguments = [args],
        inputs = depset([src], transitive = [headers]),
        outputs = [obj],
        mnemonic = "NvccCompile",
        progress_message = "Compiling %s (%s)" % (src.short_path, " ".join(gencode) if is_cuda else "host"),
        # PATH, so that nvcc finds the host compiler.
        use_default_shell_env = True,
    )
    return obj

def _cuda_python_extension_impl(ctx):
    nvcc = ctx.executable.nvcc
    archs = ctx.attr._archs[CudaArchsInfo]
    includes = [t[CudaIncludeInfo] for t in ctx.attr.includes]
    system_includes = [t[CudaIncludeInfo] for t in ctx.attr.system_includes]
    headers = depset(ctx.files.hdrs, transitive = [i.headers for i in includes + system_includes])

    # A family's sources compile only for the entries of the architecture list that are its own
    # architecture (sm_90a code never for sm_80), and not at all when there are none; the
    # define it names then tells every source that the family is built.
    entries = archs.spec.split(",")
    family_objects = []
    defines = []
    for target, arch in ctx.attr.family_srcs.items():
        own = [e for e in entries if e.partition("-")[0] == arch]
        if not own:
            continue
        gencode = [_gencode(e, str(ctx.label)) for e in own]
        for src in target.files.to_list():
            family_objects.append((src, gencode))
        define = ctx.attr.family_defines.get(arch)
        if define and define not in defines:
            defines.append(define)

    objects = [_compile(ctx, nvcc, src, archs, archs.gencode, defines, includes, system_includes, headers)
               for src in ctx.files.srcs]
    objects += [_compile(ctx, nvcc, src, archs, gencode, defines, includes, system_includes, headers)
                for src, gencode in family_objects]

    module = ctx.actions.declare_file(ctx.attr.module_name + ".so")
    args = ctx.actions.args()
    args.add_all(["-shared", "-o", module])
    args.add_all(objects)
    args.add_all(ctx.attr.linkopts)
    ctx.actions.run(
        executable = nvcc,
        arguments = [args],
        inputs = objects,
        outputs = [module],
        mnemonic = "NvccLink",
        progress_message = "Linking %s" % module.short_path,
        use_default_shell_env = True,
    )
    return [
        DefaultInfo(files = depset([module]), runfiles = ctx.runfiles(files = [module])),
        OutputGroupInfo(objects = depset(objects)),
    ]

cuda_python_extension = rule(
    implementation = _cuda_python_extension_impl,
    attrs = {
        "srcs": attr.label_list(allow_files = [".cu", ".cc", ".cpp"], doc = ".cu files are compiled as CUDA, the others as host C++."),
        "family_srcs": attr.label_keyed_string_dict(
            allow_files = [".cu"],
            doc = "Sources of one architecture only, each mapped to it (\"90a\"): compiled for the matching entries of the architecture list, or skipped when it has none.",
        ),
        "family_defines": attr.string_dict(doc = "Per architecture of family_srcs, a define (NAME=VALUE) every source gets when that family is built."),
        "hdrs": attr.label_list(allow_files = True, doc = "Headers the sources include (action inputs)."),
        "includes": attr.label_list(providers = [CudaIncludeInfo], doc = "-I directories."),
        "system_includes": attr.label_list(providers = [CudaIncludeInfo], doc = "-isystem directories."),
        "copts": attr.string_list(doc = "nvcc flags for every source."),
        "cuda_copts": attr.string_list(doc = "nvcc flags for .cu sources only (besides -gencode)."),
        "defines": attr.string_list(doc = "Preprocessor definitions, NAME or NAME=VALUE."),
        "archs_define": attr.string(doc = "A macro set to the architecture list as a string literal."),
        "linkopts": attr.string_list(doc = "nvcc flags for the link."),
        "module_name": attr.string(mandatory = True, doc = "The module's name: the output is <module_name>.so."),
        "nvcc": attr.label(
            default = Label("@jevo_cuda_config//:nvcc"),
            executable = True,
            allow_single_file = True,
            cfg = "exec",
        ),
        "_archs": attr.label(default = Label("//bazel:cuda_archs"), providers = [CudaArchsInfo]),
    },
    doc = "A Python extension module built with nvcc; its architectures come from --//bazel:cuda_archs.",
)

def _python_extension_test_impl(ctx):
    module = ctx.file.module
    python = ctx.executable.python
    script = ctx.file.script
    launcher = ctx.actions.declare_file(ctx.label.name + ".sh")

    # Tests start in the runfiles directory of the main repository; files of other repositories
    # have short paths "../<repo>/...", which resolve from there too. The working tree is put on
    # PYTHONPATH so that the script imports the package sources next to the module.
    lines = [
        "#!/bin/sh",
        "set -eu",
        'here="$(pwd)"',
        'export %s="$here/%s"' % (ctx.attr.module_env, module.short_path),
        'export JEVO_EXPECTED_CUDA_ARCHS="%s"' % ctx.attr._archs[CudaArchsInfo].spec,
        'export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"',
        'exec "$here/%s" "$here/%s" "$@"' % (python.short_path, script.short_path),
    ]
    ctx.actions.write(launcher, "\n".join(lines) + "\n", is_executable = True)
    runfiles = ctx.runfiles(files = [module, python, script] + ctx.files.data)
    return [DefaultInfo(executable = launcher, runfiles = runfiles)]

python_extension_test = rule(
    implementation = _python_extension_test_impl,
    test = True,
    attrs = {
        "module": attr.label(mandatory = True, allow_single_file = [".so"], doc = "The extension module under test."),
        "module_env": attr.string(mandatory = True, doc = "Environment variable that receives the module's absolute path."),
        "script": attr.label(mandatory = True, allow_single_file = [".py"]),
        "data": attr.label_list(allow_files = True, doc = "Python sources and other files the script reads."),
        "python": attr.label(
            default = Label("@jevo_cuda_config//:python"),
            executable = True,
            allow_single_file = True,
            cfg = "target",
        ),
        "_archs": attr.label(default = Label("//bazel:cuda_archs"), providers = [CudaArchsInfo]),
    },
    doc = "Runs `script` with the configured Python, the module's path in `module_env` and the " +
          "architectures it was built for in JEVO_EXPECTED_CUDA_ARCHS. A rule of its own rather " +
          "than sh_test/py_test: those pull in rules_cc and the Python toolchain, neither of " +
          "which an offline Bazel 4.2.3 has.",
)
