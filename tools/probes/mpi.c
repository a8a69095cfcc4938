/* Build probe (Makefile): Open MPI's headers and library link (nothing is started: no MPI_Init). */
#include <mpi.h>
#include <stdio.h>
int main(void) {
    char v[MPI_MAX_LIBRARY_VERSION_STRING];
    int len = 0;
    if (MPI_Get_library_version(v, &len) != MPI_SUCCESS) return 1;
#ifdef OMPI_MAJOR_VERSION
    printf("Open MPI %d.%d.%d\n", OMPI_MAJOR_VERSION, OMPI_MINOR_VERSION, OMPI_RELEASE_VERSION);
#else
    printf("MPI (%.40s)\n", v);
#endif
    return 0;
}
