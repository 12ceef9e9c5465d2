from xiaozhi.cli import main

main()
