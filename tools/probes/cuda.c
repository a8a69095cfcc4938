/* Build probe (Makefile): the host side of the CUDA runtime, cuBLAS and cuDNN link and load; no GPU
   is needed (nothing here talks to a device). */
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <cudnn.h>
#include <stdio.h>
int main(void) {
    int rt = 0;
    size_t dnn = cudnnGetVersion();
    if (cudaRuntimeGetVersion(&rt) != cudaSuccess || dnn == 0) return 1;
    printf("CUDA %d.%d, cuBLAS %d.%d, cuDNN %zu.%zu\n", rt / 1000, rt % 1000 / 10, CUBLAS_VER_MAJOR, CUBLAS_VER_MINOR,
           dnn / 10000, dnn % 10000 / 100);
    return 0;
}
