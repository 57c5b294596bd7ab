from caffeport.cli import main

main()
