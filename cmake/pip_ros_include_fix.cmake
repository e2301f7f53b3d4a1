# Only for building against ROS 2 from PyPI wheels (development and CI), never on a robot.
#
# The ros-* wheels export CMake targets whose INTERFACE_INCLUDE_DIRECTORIES name the Python and
# numpy include directories of the machine that built them (/opt/python/cpXY-cpXY/...). CMake
# refuses non-existent include paths at generate time, so once the project's directory has been
# processed (DEFER) we rewrite those paths to this interpreter's. Passed in by tools/build.sh as
# -DCMAKE_PROJECT_INCLUDE=..., so CMakeLists.txt stays the standard one a robot builds.

function(_malpi_fix_pip_ros_include_dirs)
  find_package(Python3 REQUIRED COMPONENTS Interpreter Development.Module NumPy)
  get_directory_property(_targets DIRECTORY "${CMAKE_SOURCE_DIR}" IMPORTED_TARGETS)
  foreach(_target IN LISTS _targets)
    get_target_property(_dirs ${_target} INTERFACE_INCLUDE_DIRECTORIES)
    if(NOT _dirs)
      continue()
    endif()
    set(_fixed "")
    foreach(_dir IN LISTS _dirs)
      if(_dir MATCHES "^/opt/python/cp[0-9]+-cp[0-9]+[a-z]*/include/python")
        set(_dir "${Python3_INCLUDE_DIRS}")
      elseif(_dir MATCHES "^/opt/python/.*/numpy/_core/include$")
        set(_dir "${Python3_NumPy_INCLUDE_DIRS}")
      endif()
      list(APPEND _fixed "${_dir}")
    endforeach()
    if(NOT "${_fixed}" STREQUAL "${_dirs}")
      set_target_properties(${_target} PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${_fixed}")
    endif()
  endforeach()
endfunction()

cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL _malpi_fix_pip_ros_include_dirs)
