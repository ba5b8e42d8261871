from vrypt_worker.cli import main

main()
