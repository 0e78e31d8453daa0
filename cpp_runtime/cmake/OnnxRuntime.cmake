# onnxruntime::onnxruntime from ONNXRUNTIME_ROOT (include/ or include/onnxruntime/, lib/libonnxruntime.so), with the
# C API version checked: the code needs ORT_API_VERSION >= 21 (ONNX Runtime 1.21).
set(SD_ORT_API_REQUIRED 21)
if(NOT ONNXRUNTIME_ROOT)
  message(FATAL_ERROR "Set -DONNXRUNTIME_ROOT=<ONNX Runtime SDK> (an official release folder, or run "
                      "scripts/assemble_ort_sdk.sh / `make cpp`)")
endif()
find_path(ORT_INCLUDE_DIR onnxruntime_cxx_api.h
  PATHS "${ONNXRUNTIME_ROOT}/include" "${ONNXRUNTIME_ROOT}/include/onnxruntime"
        "${ONNXRUNTIME_ROOT}/include/onnxruntime/core/session" NO_DEFAULT_PATH)
find_library(ORT_LIBRARY NAMES onnxruntime PATHS "${ONNXRUNTIME_ROOT}/lib" "${ONNXRUNTIME_ROOT}/lib64" NO_DEFAULT_PATH)
if(NOT ORT_INCLUDE_DIR OR NOT ORT_LIBRARY)
  message(FATAL_ERROR "ONNXRUNTIME_ROOT=${ONNXRUNTIME_ROOT} has no onnxruntime_cxx_api.h / libonnxruntime.so")
endif()
file(STRINGS "${ORT_INCLUDE_DIR}/onnxruntime_c_api.h" _ort_api REGEX "^#define ORT_API_VERSION [0-9]+")
string(REGEX MATCH "[0-9]+" ORT_API_VERSION "${_ort_api}")
if(ORT_API_VERSION LESS SD_ORT_API_REQUIRED)
  message(FATAL_ERROR "ONNX Runtime headers declare API ${ORT_API_VERSION}; safe-denoiser-cpp needs >= ${SD_ORT_API_REQUIRED}")
endif()
message(STATUS "ONNX Runtime: ${ORT_LIBRARY} (headers: API ${ORT_API_VERSION}, required ${SD_ORT_API_REQUIRED})")
add_library(onnxruntime::onnxruntime SHARED IMPORTED)
set_target_properties(onnxruntime::onnxruntime PROPERTIES
  IMPORTED_LOCATION "${ORT_LIBRARY}" IMPORTED_SONAME "libonnxruntime.so.1"
  INTERFACE_INCLUDE_DIRECTORIES "${ORT_INCLUDE_DIR}")
get_filename_component(_ort_lib_dir "${ORT_LIBRARY}" DIRECTORY)
# The programs find the library where they were built against it, without LD_LIBRARY_PATH.
set(CMAKE_BUILD_RPATH "${_ort_lib_dir}")
set(CMAKE_INSTALL_RPATH "${_ort_lib_dir}")
