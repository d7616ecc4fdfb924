{
  "variables": {
    # MPI (the tensor strategy) with Open MPI's compiler wrapper, which answers --showme; with
    # another MPI's wrapper (MPICH's takes -compile-info) or none, the addon builds without it.
    "has_mpi": "<!(sh -c 'mpicxx --showme:compile >/dev/null 2>&1 && echo 1 || echo 0')"
  },
  "targets": [
    {
      "target_name": "blossom_native",
      "sources": [
        "native/src/addon.cc",
        "native/src/cpu_features.cc",
        "native/src/thread_pool.cc",
        "native/src/memory.cc",
        "native/src/io.cc",
        "native/src/mpi.cc",
        "native/src/matmul.cc",
        "native/src/norm.cc",
        "native/src/attention.cc",
        "native/src/convert.cc",
        "native/src/sampling.cc",
        "native/src/probes.cc",
        "native/src/quant.cc"
      ],
      "include_dirs": ["<!@(node -p \"require('node-addon-api').include\")"],
      "dependencies": ["<!(node -p \"require('node-addon-api').targets\"):node_addon_api_except"],
      "cflags!": ["-fno-exceptions", "-O2"],
      "cflags_cc!": ["-fno-exceptions", "-fno-rtti", "-O2", "-std=gnu++17"],
      "cflags": ["-O3", "-fno-math-errno", "-fno-trapping-math"],
      "cflags_cc": ["-std=c++17", "-O3", "-fno-math-errno", "-fno-trapping-math", "-fexceptions", "-Wall", "-Wextra", "-Wno-unused-parameter"],
      "defines": ["NAPI_VERSION=8"],
      "libraries": ["-lpthread", "-ldl"],
      "conditions": [
        ["has_mpi==1", {
          "defines": ["BLOSSOM_MPI", "OMPI_SKIP_MPICXX", "MPICH_SKIP_MPICXX"],
          "cflags_cc": ["<!@(mpicxx --showme:compile)"],
          "libraries": ["<!@(mpicxx --showme:link)"]
        }]
      ]
    }
  ]
}
