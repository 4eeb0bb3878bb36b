# Helpers of cuda/CMakeLists.txt: messages the user sees, architectures, stable header copies.
# Also runs as a script, for the tests (tests/test_build_config.py):
#   cmake -DJEVO_ACTION=archs -DCAPS="9.0;8.6" -P jevo.cmake   -> prints the architectures
#   cmake -DJEVO_ACTION=stage -DSRC=... -DDST=... -P jevo.cmake -> stages SRC into DST

set(JEVO_PACKAGING_DIR "${CMAKE_CURRENT_LIST_DIR}")

# Prints "jevo: <message>" to CMake's output (as `mode`: STATUS or WARNING) and, when the build
# runs under pip (which hides build output unless -v), also where the user sees it: the build
# backend (cuda/packaging/jevo_build_backend.py) names that place in JEVO_BUILD_NOTIFY.
function(_jevo_notify mode)
  string(JOIN "" msg ${ARGN})
  message(${mode} "jevo: ${msg}")
  if(NOT "$ENV{JEVO_BUILD_NOTIFY}" STREQUAL "")
    execute_process(COMMAND sh "${JEVO_PACKAGING_DIR}/progress.sh" say "${msg}"
                    OUTPUT_QUIET ERROR_QUIET)
  endif()
endfunction()

function(jevo_say)
  _jevo_notify(STATUS ${ARGN})
endfunction()

function(jevo_warn)
  _jevo_notify(WARNING ${ARGN})
endfunction()

# CMake CUDA_ARCHITECTURES entries for GPUs of the given compute capabilities ("9.0;8.6"):
# SASS for each ("86-real"), sm_90a for 9.0 (the Hopper kernel family needs it). Capabilities
# below 8.0, which the kernels do not support, are left out.
function(jevo_archs_for_caps out caps)
  set(archs "")
  foreach(cap IN LISTS caps)
    string(STRIP "${cap}" cap)
    if(NOT cap MATCHES "^([0-9]+)\\.([0-9]+)$")
      continue()
    endif()
    set(major "${CMAKE_MATCH_1}")
    set(minor "${CMAKE_MATCH_2}")
    if(major LESS 8)
      continue()
    endif()
    if(cap STREQUAL "9.0")
      list(APPEND archs "90a-real")
    else()
      list(APPEND archs "${major}${minor}-real")
    endif()
  endforeach()
  list(REMOVE_DUPLICATES archs)
  set(${out} "${archs}" PARENT_SCOPE)
endfunction()

# Normalises a user's list ("80;90a", "80,90a", "sm_80 sm_90a", "8.6") to CMake entries; an
# entry without -real/-virtual gets -real (SASS only, as the default). native, all and
# all-major pass through to CMake.
function(jevo_normalize_archs out spec)
  string(REGEX REPLACE "[,; ]+" ";" items "${spec}")
  set(archs "")
  foreach(item IN LISTS items)
    string(STRIP "${item}" item)
    string(TOLOWER "${item}" item)
    if(item STREQUAL "")
      continue()
    elseif(item MATCHES "^(native|all|all-major)$")
      list(APPEND archs "${item}")
      continue()
    endif()
    string(REGEX REPLACE "^(sm_|compute_)" "" item "${item}")
    if(item MATCHES "^([0-9]+)\\.([0-9]+)(.*)$")
      set(item "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
    endif()
    if(NOT item MATCHES "^[0-9]+[af]?(-real|-virtual)?$")
      message(FATAL_ERROR "jevo: '${item}' in JEVO_CUDA_ARCHS='${spec}' is not a CUDA "
                          "architecture (examples: 80, 90a, 86-real, 120-virtual)")
    endif()
    if(NOT item MATCHES "-(real|virtual)$")
      set(item "${item}-real")
    endif()
    list(APPEND archs "${item}")
  endforeach()
  list(REMOVE_DUPLICATES archs)
  set(${out} "${archs}" PARENT_SCOPE)
endfunction()

# The compute capabilities of the GPUs that nvidia-smi sees (empty when none or no driver).
function(jevo_visible_gpu_caps out)
  set(caps "")
  find_program(_jevo_nvidia_smi nvidia-smi NO_CACHE)
  if(_jevo_nvidia_smi)
    execute_process(COMMAND "${_jevo_nvidia_smi}" --query-gpu=compute_cap --format=csv,noheader
                    RESULT_VARIABLE rc OUTPUT_VARIABLE text ERROR_QUIET TIMEOUT 30)
    if(rc EQUAL 0)
      string(REGEX MATCHALL "[0-9]+\\.[0-9]+" caps "${text}")
    endif()
  endif()
  set(${out} "${caps}" PARENT_SCOPE)
endfunction()

# Copies every file of src into dst, leaving a file whose content is unchanged untouched (same
# path, same mtime), and removes files that src no longer has. Headers that come from pip's
# temporary build environment (a new path on every install) are staged into the build dir this
# way, so the compile commands and their dependency lists stay the same from one install to the
# next and ninja recompiles only what a real change of the headers affects.
function(jevo_stage_headers src dst)
  if(NOT IS_DIRECTORY "${src}")
    message(FATAL_ERROR "jevo: header directory ${src} does not exist")
  endif()
  file(GLOB_RECURSE files LIST_DIRECTORIES false RELATIVE "${src}" "${src}/*")
  file(GLOB_RECURSE present LIST_DIRECTORIES false RELATIVE "${dst}" "${dst}/*")
  set(dirs "")
  foreach(f IN LISTS files)
    get_filename_component(d "${f}" DIRECTORY)
    list(APPEND dirs "${d}")
  endforeach()
  list(REMOVE_DUPLICATES dirs)
  foreach(d IN LISTS dirs)
    file(MAKE_DIRECTORY "${dst}/${d}")
  endforeach()
  foreach(f IN LISTS files)
    file(COPY_FILE "${src}/${f}" "${dst}/${f}" ONLY_IF_DIFFERENT)
  endforeach()
  if(present)
    list(REMOVE_ITEM present ${files})
    foreach(f IN LISTS present)
      file(REMOVE "${dst}/${f}")
    endforeach()
  endif()
endfunction()

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  if(JEVO_ACTION STREQUAL "archs")
    jevo_archs_for_caps(archs "${CAPS}")
    message(NOTICE "${archs}")
  elseif(JEVO_ACTION STREQUAL "normalize")
    jevo_normalize_archs(archs "${SPEC}")
    message(NOTICE "${archs}")
  elseif(JEVO_ACTION STREQUAL "stage")
    jevo_stage_headers("${SRC}" "${DST}")
  else()
    message(FATAL_ERROR "jevo.cmake: JEVO_ACTION must be archs, normalize or stage")
  endif()
endif()
