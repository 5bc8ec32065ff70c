#pragma once
// CI syntax-check stand-in (see README.md): only the handle type CUDAContextLight.h names.
typedef struct cublasLtContext* cublasLtHandle_t;
